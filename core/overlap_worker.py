"""OverlapWorker: runs the forward + sampling of launched batches on its own thread, in order.

The scheduler thread prepares a batch completely (ScheduleBatch -> ForwardBatch, sampling
tensors, the sample positions) and ``submit``s it as a LaunchedStep; the worker resolves its
future token ids, runs ``ModelRunner.forward_logits`` and samples, stores the sampled ids into
the FutureTokenMap and copies the outputs to the host. ``wait`` hands the host copies back as a
StepResult. The worker reads only what the LaunchedStep snapshots (never a Req), so the
scheduler may change requests while the batch computes.

On CUDA the worker has its own stream: it waits on an event the scheduler records after
preparing (``ready``) instead of a sync, the outputs go to pinned host memory with
non-blocking copies, and ``wait`` synchronizes on the event recorded after them (``copy_done``)
— the host never waits for the device except for the results it is about to process. The
decode graphs (CUDA graphs / torch.compile buckets) are replayed on that stream as usual.
On the CPU the worker is a plain thread: torch releases the GIL inside ops, so the scheduler's
Python work runs while the worker computes (correct, but measured slower on 2 cores, so off by
default there: backend_select.resolve_overlap_schedule).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvyard.forward_batch import ForwardBatch
from kvyard.future_tokens import FutureTokenMap
from kvyard.sampling.sampler import logprobs_of, top_logprobs
from kvyard.schedule_batch import ScheduleBatch, StepResult

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """One batch handed to the worker. Everything the worker reads is fixed at launch."""
    batch: ScheduleBatch                 # held until processed: its tensors must outlive the step
    fb: ForwardBatch                     # input_ids may hold future placeholders (< 0)
    sample_positions: torch.Tensor       # [S] int64 sequence length at each sample row (seeds)
    want_logprob: bool
    top_logprobs_nums: list[int]         # [S]
    future_start: int                    # FutureTokenMap range of the S sampled ids
    has_futures: bool = False            # some input id is a placeholder
    input_targets: Optional[torch.Tensor] = None  # [P] prompt-logprob targets, None without
    input_top_k: int = 0
    ready: Any = None                    # torch.cuda.Event recorded after preparing (CUDA)
    # filled by the worker
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Optional[dict[str, torch.Tensor]] = None   # host tensors (pinned on CUDA)
    copy_done: Any = None                # torch.cuda.Event after the host copies (CUDA)
    error: Optional[BaseException] = None

    @property
    def num_samples(self) -> int:
        return len(self.top_logprobs_nums)


class OverlapWorker:
    def __init__(self, runner, future: FutureTokenMap):
        self.runner = runner
        self.future = future
        self.device = torch.device(runner.device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:     # the thread's current device is its own
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self._queue: "queue.SimpleQueue[Optional[LaunchedStep]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kvyard-overlap-worker", daemon=True)
        self._thread.start()

    # -- scheduler thread ---------------------------------------------------------------------
    def submit(self, step: LaunchedStep) -> None:
        """Queues a prepared batch; on CUDA after recording that its inputs are written."""
        if self.is_cuda:
            step.ready = torch.cuda.Event()
            step.ready.record()                 # the scheduler's current stream
        self._queue.put(step)

    def wait(self, step: LaunchedStep) -> StepResult:
        """The step's results on the host; re-raises what the worker raised for it."""
        step.done.wait()
        if step.error is not None:
            raise step.error
        if step.copy_done is not None:
            step.copy_done.synchronize()
        return to_step_result(step.outputs, step.top_logprobs_nums)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # -- worker thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.is_cuda:
            torch.cuda.set_device(self.device)
        while True:
            step = self._queue.get()
            if step is None:
                return
            try:
                with torch.inference_mode():
                    if self.is_cuda:
                        with torch.cuda.stream(self.stream):
                            self._run(step)
                    else:
                        self._run(step)
            except BaseException as exc:        # reported to the scheduler by wait()
                step.error = exc
            step.done.set()

    def _run(self, step: LaunchedStep) -> None:
        if self.is_cuda:
            self.stream.wait_event(step.ready)
        if step.has_futures:
            self.future.resolve_(step.fb.input_ids)
        logits = self.runner.forward_logits(step.fb)
        outputs = sample_outputs(self.runner.sampler, step, logits)
        self.future.store(step.future_start, outputs["next_ids"])
        if self.is_cuda:
            outputs = {name: t.to("cpu", non_blocking=True) for name, t in outputs.items()}
            step.copy_done = torch.cuda.Event()
            step.copy_done.record(self.stream)
        step.outputs = outputs


def sample_outputs(sampler, step: LaunchedStep, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Device tensors of one step: next_ids [S] (+ logprobs [S], top values/ids [S, K], prompt
    logprobs [P] and their top values/ids [P, K'] where asked). Rows of ``logits``: the S sample
    rows, then the P prompt-logprob rows (ModelRunner.prepare's logits_indices order)."""
    s = step.num_samples
    out: dict[str, torch.Tensor] = {}
    if s:
        sampled = sampler(logits[:s], step.batch.sampling_info, step.sample_positions,
                          step.want_logprob, step.top_logprobs_nums)
        out["next_ids"] = sampled.next_ids
        if sampled.logprobs is not None:
            out["logprobs"] = sampled.logprobs
        if sampled.top_logprobs is not None:
            out["top_values"], out["top_ids"] = sampled.top_logprobs
    else:
        out["next_ids"] = torch.empty(0, dtype=torch.int64, device=logits.device)
    if step.input_targets is not None:
        prompt_rows = logits[s:]
        out["input_logprobs"] = logprobs_of(prompt_rows, step.input_targets)
        if step.input_top_k > 0:
            out["input_top_values"], out["input_top_ids"] = top_logprobs(prompt_rows, step.input_top_k)
    return out


def to_step_result(outputs: dict[str, torch.Tensor], top_nums: list[int]) -> StepResult:
    """Host tensors of ``sample_outputs`` -> the StepResult ``Scheduler._process`` takes."""
    lists = {name: t.tolist() for name, t in outputs.items()}
    result = StepResult(next_ids=lists["next_ids"], logprobs=lists.get("logprobs"),
                        input_logprobs=lists.get("input_logprobs"))
    if "top_values" in lists:
        result.top_logprobs = [list(zip(v[:k], i[:k]))
                               for v, i, k in zip(lists["top_values"], lists["top_ids"], top_nums)]
    if "input_top_values" in lists:
        result.input_top_logprobs = [list(zip(v, i)) for v, i in
                                     zip(lists["input_top_values"], lists["input_top_ids"])]
    return result
