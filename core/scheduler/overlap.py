"""OverlapScheduler: prepares batch N+1 while batch N computes (off with --disable-overlap-schedule).

One ``step()``:
  1. if batch N (launched, not processed) is a sync point (below), wait for it and process it;
  2. schedule batch N+1 as Scheduler does (extend or decode). A request whose last token N has
     not returned yet feeds N's future placeholder instead (core/future_tokens.py), and its
     sampling position counts that token;
  3. launch N+1 on the OverlapWorker (core/overlap_worker.py): forward + sampling on the worker
     thread (its own CUDA stream on GPU);
  4. wait for N and process its results — stop checks, outputs, logprobs, grammar, prefix
     cache — while N+1 computes. Between steps the scheduler loop drains its inbox, also while
     N+1 computes.

Invariants, on the scheduler thread between calls:
  - at most one batch is launched and unprocessed (``_inflight``); the worker runs batches in
    launch order, so a batch sees the KV and the future tokens of every batch before it.
  - ``kv_len`` counts the KV of every launched batch (advanced at launch), and the slots of the
    batch in flight belong to its requests in the bookkeeping: check_integrity holds at any time.
  - a request released (finished, aborted, retracted, failed) while the batch in flight still
    computes KV for it first gives that KV back: kv_len drops to what is computed and the pages
    only the in-flight tokens use are freed. The prefix cache therefore only ever receives
    computed KV, and a request that finished at N keeps no slot for the extra token N+1
    computes for it: nothing leaks.
  - processing a batch skips the requests released since its launch (that extra token, the
    token of a request retracted or aborted meanwhile).
  - a slot or req_to_token row freed while a batch is in flight may go to the next batch at
    once: its new owner writes it in that later batch, after the in-flight batch is done with
    it, and what the in-flight batch reads there only feeds a skipped row.
  - requests whose prefill completes join ``running`` at the launch of their extend batch, so
    the next decode batch includes them (with placeholders).

Sync points: batch N is processed before N+1 is scheduled when
  - N has a request with a grammar: its next mask needs N's token (serialized, the simple way;
    SGLang instead lets the worker wait for the mask);
  - N has a request with penalties or min_new_tokens: their host-side state (rebuilt when the
    batch's requests change) must include N's tokens;
  - N has a request with a thinking budget: its token may be overwritten on the host;
  - N is an extend batch with an unfinished chunk: the next chunk starts from the prefix that
    N's results cache (cache_unfinished_req).
Embedding models do not use overlap (backend_select.resolve_overlap_schedule).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from kvyard.scheduler.future_tokens import FutureTokenMap
from kvyard.scheduler.io_struct import ReqUpdate
from kvyard.executor.overlap_worker import LaunchedStep, OverlapWorker
from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch
from kvyard.scheduler.scheduler import GRAMMAR_WAIT_S, Scheduler
from kvyard.executor.step_sampling import sampling_spec

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    step: LaunchedStep
    rows: list[Optional[int]]      # [B] each request's req_to_token row at launch
    kv_tokens: dict[int, int]      # id(req) -> KV tokens this batch computes for it, until waited
    futures: dict[int, int]        # id(req) -> placeholder of the token this batch samples for it
    sync_point: bool               # grammar / penalty requests (see the module docstring)

    @property
    def batch(self) -> ScheduleBatch:
        return self.step.batch


def needs_host_state(req: Req) -> bool:
    """Whether sampling the request's next token needs the host to have processed its last."""
    p = req.sampling_params
    return (req.grammar is not None or p.frequency_penalty != 0 or p.presence_penalty != 0
            or p.repetition_penalty != 1.0 or p.min_new_tokens > 0
            or p.thinking_budget is not None)  # it may overwrite the sampled token


class OverlapScheduler(Scheduler):
    def __init__(self, config, runner, eos_token_ids: list[int], tokenizer_factory=None, grammar=None):
        super().__init__(config, runner, eos_token_ids, tokenizer_factory, grammar=grammar)
        self.future = FutureTokenMap(runner.max_running_requests, runner.device)
        self.worker = OverlapWorker(runner, self.future)
        self._inflight: Optional[_InFlight] = None

    def has_work(self) -> bool:
        return super().has_work() or self._inflight is not None

    def _active(self) -> list[Req]:
        """Also the requests only the batch in flight holds (a prefill chunk, max_new_tokens=0)."""
        active = super()._active()
        if self._inflight is not None:
            known = {id(r) for r in active}
            active += [r for r in self._inflight.batch.reqs if r.req_pool_idx is not None and id(r) not in known]
        return active

    def step(self) -> list[ReqUpdate]:
        updates: list[ReqUpdate] = []
        prev = self._inflight
        if prev is not None and self._is_sync_point(prev):
            updates += self.finish_inflight()
            prev = None
        batch = self._schedule_extend() or self._schedule_decode()
        if batch is not None:
            updates += self._launch(batch)   # the batch in flight from now on (None if it failed)
        else:
            self._inflight = None
        if prev is not None:
            updates += self._complete(prev)
        elif batch is None and self.grammar is not None and self.waiting:
            self.grammar.wait_for_compile(GRAMMAR_WAIT_S)
        updates += self._drain_pending()
        if self.config.debug_kv_integrity:
            self.check_integrity()
        return updates

    def finish_inflight(self) -> list[ReqUpdate]:
        prev, self._inflight = self._inflight, None
        updates = self._complete(prev) if prev is not None else []
        return updates + self._drain_pending()

    def close(self) -> None:
        self.worker.close()

    # -- launch -----------------------------------------------------------------------------
    @staticmethod
    def _is_sync_point(inflight: _InFlight) -> bool:
        batch = inflight.batch
        unfinished_chunk = batch.mode.is_extend() and len(batch.sample_req_idx) < len(batch.reqs)
        return unfinished_chunk or inflight.sync_point

    def _input_token(self, req: Req) -> int:
        prev = self._inflight
        if prev is not None and id(req) in prev.futures:
            return prev.futures[id(req)]
        return req.output_ids[-1]

    def _launch(self, batch: ScheduleBatch) -> list[ReqUpdate]:
        """Hands the batch to the worker and makes it the batch in flight; a batch that cannot
        even be prepared fails its requests (as a failing forward does without overlap)."""
        self._advance_kv(batch)
        try:
            step = self._prepare(batch)
        except Exception as exc:
            logger.exception("preparing a %s step failed", batch.mode.name.lower())
            updates = self._fail_batch(batch, f"internal error: {type(exc).__name__}: {exc}")
            self._inflight = None
            return updates
        self.worker.submit(step)
        sampled = [batch.reqs[i] for i in batch.sample_req_idx]
        self._inflight = _InFlight(
            step, rows=[r.req_pool_idx for r in batch.reqs],
            kv_tokens={id(r): n for r, n in zip(batch.reqs, batch.extend_lens)},
            futures={id(r): FutureTokenMap.placeholder(step.future_start, k) for k, r in enumerate(sampled)},
            sync_point=any(needs_host_state(r) for r in batch.reqs))
        if batch.mode.is_extend():
            self.running += [r for r in sampled if r.sampling_params.max_new_tokens > 0]
        return []

    def _prepare(self, batch: ScheduleBatch) -> LaunchedStep:
        """Everything the worker needs, snapshotted from the requests now (they change while it
        computes). The sampling position of a request whose last token is still in flight
        counts that token."""
        if self.grammar is not None:
            self.grammar.apply_masks(batch)
        prev, dev = self._inflight, self.runner.device
        pending = prev.futures if prev is not None else {}
        sampled = [batch.reqs[i] for i in batch.sample_req_idx]
        positions = [r.seq_len + (id(r) in pending) for r in sampled]
        return LaunchedStep(
            batch=batch, fb=self.runner.prepare(batch), sampling=sampling_spec(batch, positions, dev),
            future_start=self.future.allocate(len(sampled)),
            has_futures=batch.mode.is_decode() and any(t < 0 for t in batch.input_ids))

    # -- results ----------------------------------------------------------------------------
    def _complete(self, inflight: _InFlight) -> list[ReqUpdate]:
        """Waits for a launched batch and processes its results for the requests it still owns."""
        try:
            result = self.worker.wait(inflight.step)
        except Exception as exc:
            logger.error("a %s step failed", inflight.batch.mode.name.lower(), exc_info=exc)
            inflight.kv_tokens.clear()
            batch, _, _ = inflight.batch.select(self._owned(inflight))
            return self._fail_batch(batch, f"internal error: {type(exc).__name__}: {exc}")
        inflight.kv_tokens.clear()          # computed: a release from now on keeps it
        if inflight.sync_point:             # the next batch is scheduled after this update
            super()._record_sampled(inflight.batch, result.next_ids)
        batch, keep = inflight.batch, self._owned(inflight)
        if len(keep) < len(batch.reqs):
            batch, samples, inputs = batch.select(keep)
            result = result.select(samples, inputs)
        return self._process(batch, result)

    @staticmethod
    def _owned(inflight: _InFlight) -> list[int]:
        """Indices of the batch's requests not released since its launch."""
        return [i for i, r in enumerate(inflight.batch.reqs)
                if r.req_pool_idx is not None and r.req_pool_idx == inflight.rows[i] and not r.finished()]

    def _record_sampled(self, batch: ScheduleBatch, next_ids: list[int]) -> None:
        """Done in _complete for sync points only: other batches have no penalty state, and the
        batch launched meanwhile may share this one's SamplingBatchInfo."""

    def _start_running(self, req: Req) -> None:
        if not any(r is req for r in self.running):   # joined at launch unless retracted since
            self.running.append(req)

    # -- releasing KV of the batch in flight --------------------------------------------------
    def _release(self, req: Req, insert: bool) -> None:
        inflight = self._inflight
        pending = inflight.kv_tokens.pop(id(req), 0) if inflight is not None else 0
        if pending and req.req_pool_idx is not None:
            self._give_back_kv(req, pending)
        super()._release(req, insert)

    def _give_back_kv(self, req: Req, n: int) -> None:
        """Drops the last n KV tokens (not computed yet) of a request: frees the pages only they
        use (the page of the last kept token stays with the request) and shortens kv_len."""
        keep = req.kv_len - n
        first_free = -(-keep // self.page_size) * self.page_size
        if first_free < req.kv_len:
            row = self.req_to_token.table[req.req_pool_idx]
            self.allocator.free(row[first_free:req.kv_len].to(torch.int64))
        req.kv_len = keep
