"""Continuous decode: several decode steps of a small batch in one scheduler iteration.

When nothing waits (no queued request, no prefill chunk) and the decode batch is small (at most
``MAX_BATCH`` requests: a chat user or two), the per-step work around the forward — choosing the
batch, reserving and allocating its KV, the loop's inbox poll and bookkeeping — is a visible part
of a CPU step. ``--num-continuous-decode-steps N`` (SGLang's name; kvyard's default 8, 1 turns it
off) lets one iteration run up to N decode steps of the same requests:

  - the KV slots of all the steps are allocated at once (``_alloc_steps``: one ``_alloc`` per
    request, its req_to_token row written for every step) and counted in ``kv_len`` from the start;
    the run's InFlight record counts the ones not computed yet, so a request released during the
    run (finished, failed) gives them back first, and the run gives back what its requests did
    not use when it ends early. check_kv_integrity holds after every sub-step.
  - each sub-step is an ordinary decode ScheduleBatch (its own positions and slot column) through
    ``executor.launch`` / ``wait`` and ``_process``: the same kernels, sampling positions and stop
    checks as single steps, so greedy and seeded output are identical.
  - each sub-step's updates are streamed as it is sampled (``emit``, set by the scheduler process
    to push one BatchTokenOut per sub-step): a client's tokens arrive one step apart as without
    the run, never in bursts of N. Without ``emit`` (tests, in-process benchmarks) the updates come
    back from ``Scheduler.step`` together.
  - the run stops after the sub-step in which any request finished (length, EOS, stop token or
    string), at N steps, at the request's max_new_tokens or context end (N is capped by both), or
    when ``inbox_pending`` says a message arrived (a new request's prefill or an abort waits at
    most one step, as without the run).

Not run (single steps as before) with overlap scheduling (the overlap worker already hides this
host work behind the forward), speculative decoding, or a request with a grammar, penalties,
min_new_tokens, a thinking budget, logprobs, hidden states (each needs the host between steps or
per-step outputs the run does not carry), or when the pool cannot hold every step's slots.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.scheduler.inflight import InFlight, needs_host_state
from kvyard.scheduler.io_struct import ReqUpdate
from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch

logger = logging.getLogger(__name__)

MAX_BATCH = 4   # most running requests a continuous run takes (batch 1 is the target)


class ContinuousDecodeMixin:
    """Part of the Scheduler (reads its config, allocator, cache, executor; calls its ``_alloc``,
    ``_process``, ``_fail_batch``, ``_give_back_kv``). Owns two hooks the scheduler process sets:"""
    emit: Optional[Callable[[list[ReqUpdate]], None]] = None   # sends one sub-step's updates now
    inbox_pending: Optional[Callable[[], bool]] = None         # True once a message waits

    def _continuous_steps(self, reqs: list[Req]) -> int:
        """How many decode steps the running requests get in this iteration (1: a plain step)."""
        n = self.config.num_continuous_decode_steps
        if n <= 1 or len(reqs) > MAX_BATCH or self.waiting or self.chunked_req is not None \
                or self.config.enable_overlap or self.speculation is not None:
            return 1
        for r in reqs:
            if needs_host_state(r) or r.return_logprob or r.return_hidden_states:
                return 1
            left = min(r.sampling_params.max_new_tokens - len(r.output_ids), self.config.context_length - r.seq_len)
            n = min(n, left)
        return max(n, 1)

    def _alloc_steps(self, reqs: list[Req], steps: int) -> Optional[torch.Tensor]:
        """int64 [steps, B] the slots of every step (row j: step j's, contiguous), written into
        req_to_token past each kv_len; None when the pool cannot hold them even after eviction
        (nothing allocated then)."""
        need = sum(self.allocator.pages_needed(r.kv_len, steps) for r in reqs) * self.page_size
        if self.allocator.available() < need:
            self.cache.evict(need - self.allocator.available())
        if self.allocator.available() < need:
            return None
        return torch.stack([self._alloc(r, steps) for r in reqs], dim=1)

    def _run_steps(self, batch: ScheduleBatch) -> list[ReqUpdate]:
        """Runs the continuous decode ``batch`` (its ``step_slots`` [N, B]) sub-step by sub-step;
        returns the updates not emitted already."""
        reqs, steps = batch.reqs, batch.num_steps
        starts = list(batch.prefix_lens)                  # [B] KV length before the run
        for r in reqs:
            r.kv_len += steps
        inflight = InFlight(None, batch, rows=[r.req_pool_idx for r in reqs],
                            kv_tokens={id(r): steps for r in reqs}, futures={}, sync_point=True)
        self._inflight = inflight
        updates: list[ReqUpdate] = []
        sub = batch
        for j in range(steps):
            try:
                result = self.executor.wait(self.executor.launch(sub, [r.seq_len for r in reqs]))
            except Exception as exc:   # fail the run's requests (their slots all go back), keep serving
                logger.error("a decode step failed", exc_info=exc)
                inflight.kv_tokens.clear()
                updates += self._fail_batch(batch, f"internal error: {type(exc).__name__}: {exc}")
                self._inflight = None
                return updates
            for r in reqs:
                inflight.kv_tokens[id(r)] -= 1           # computed: a release from now on keeps it
            news = self._process(sub, result)
            last = j == steps - 1 or any(r.finished() for r in reqs) or \
                (self.inbox_pending is not None and self.inbox_pending())
            if last:
                updates += news
                break
            if news and self.emit is not None:
                self.emit(news)
            else:
                updates += news
            sub = _sub_step(batch, starts, j + 1)
        self._inflight = None
        for r in reqs:                                     # the steps the run did not take
            pending = inflight.kv_tokens.pop(id(r), 0)
            if pending and r.req_pool_idx is not None:
                self._give_back_kv(r, pending)
        self.step_log.more_decode_steps(j, j * len(reqs), self.load_info)   # step() counts the first
        return updates


def _sub_step(batch: ScheduleBatch, starts: list[int], j: int) -> ScheduleBatch:
    """Decode step ``j`` of a continuous run: each request's last token at position start + j,
    written to its slot of row j."""
    positions = [s + j for s in starts]
    return ScheduleBatch(
        mode=ForwardMode.DECODE, reqs=batch.reqs, input_ids=[r.output_ids[-1] for r in batch.reqs],
        positions=positions, out_cache_loc=batch.step_slots[j], prefix_lens=positions,
        extend_lens=[1] * len(batch.reqs), sample_rows=batch.sample_rows, sample_req_idx=batch.sample_req_idx,
        sampling_info=batch.sampling_info)
