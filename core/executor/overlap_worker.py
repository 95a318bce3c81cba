"""OverlapWorker: runs the forward + sampling of launched batches on its own thread, in order.

The pair of SyncExecutor (core/executor/sync_executor.py): the same launch / wait / close calls.
The scheduler thread ``launch``es a batch: it is prepared completely there (ScheduleBatch ->
ForwardBatch, sampling tensors, the sample positions) and queued as a LaunchedStep; the worker resolves its
future token ids, runs ``ModelRunner.forward_outputs`` and samples, stores the sampled ids into
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
from kvyard.scheduler.future_tokens import FutureTokenMap
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult
from kvyard.executor.step_sampling import SamplingSpec, sample_outputs, sampling_spec, to_step_result
from kvyard.executor.model_runner import captured_hidden

logger = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """One batch handed to the worker. Everything the worker reads is fixed at launch."""
    batch: ScheduleBatch                 # held until processed: its tensors must outlive the step
    fb: ForwardBatch                     # input_ids may hold future placeholders (< 0)
    sampling: SamplingSpec
    future_start: Optional[int]          # FutureTokenMap range of the S sampled ids (None: not stored)
    has_futures: bool = False            # some input id is a placeholder
    ready: Any = None                    # torch.cuda.Event recorded after preparing (CUDA)
    # filled by the worker
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Optional[dict[str, torch.Tensor]] = None   # host tensors (pinned on CUDA)
    copy_done: Any = None                # torch.cuda.Event after the host copies (CUDA)
    error: Optional[BaseException] = None


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
    def launch(self, batch: ScheduleBatch, positions: list[int]) -> LaunchedStep:
        """Prepares ``batch`` now (its requests change while it computes) and queues it.
        positions [S]: each sampled request's sequence length, counting a token still in flight."""
        step = LaunchedStep(
            batch=batch, fb=self.runner.prepare(batch),
            sampling=sampling_spec(batch, positions, self.runner.device),
            # a verify batch's tokens are never read as futures (it is a sync point)
            future_start=None if batch.is_verify else self.future.allocate(len(batch.sample_req_idx)),
            has_futures=(batch.mode.is_decode() or batch.mixed_decodes > 0) and any(t < 0 for t in batch.input_ids))
        self.submit(step)
        return step

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
        result = to_step_result(step.outputs, step.sampling.top_logprobs_nums)
        result.captured_hidden = captured_hidden(step.fb)
        return result

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
        logits, hidden = self.runner.forward_outputs(step.fb)
        outputs = sample_outputs(self.runner.sampler, step.sampling, logits, hidden)
        if step.future_start is not None:
            self.future.store(step.future_start, outputs["next_ids"])
        if self.is_cuda:
            outputs = {name: t.to("cpu", non_blocking=True) for name, t in outputs.items()}
            step.copy_done = torch.cuda.Event()
            step.copy_done.record(self.stream)
        step.outputs = outputs
