"""The batch in flight: launched on the executor, its results not processed yet.

``Scheduler.step`` launches batch N+1 and then completes batch N. With overlap scheduling
(an OverlapWorker executor) N+1 is scheduled and prepared while N computes, as SGLang's overlap
scheduler; without it (the SyncExecutor) a batch is launched and completed in the same step, so
nothing is ever in flight between steps. Invariants, on the scheduler thread between calls:

  - at most one batch is launched and unprocessed (``Scheduler._inflight``); the executor runs
    batches in launch order, so a batch sees the KV and the future tokens of every batch before it.
  - ``kv_len`` counts the KV of every launched batch (advanced at launch), and the slots of the
    batch in flight belong to its requests in the bookkeeping: check_integrity holds at any time.
  - a request released (finished, aborted, retracted, failed) while the batch in flight still
    computes KV for it first gives that KV back: kv_len drops to what is computed and the pages
    only the in-flight tokens use are freed. The prefix cache therefore only ever receives
    computed KV, and a request that finished at N keeps no slot for the extra token N+1
    computes for it: nothing leaks.
  - completing a batch skips the requests released since its launch (that extra token, the
    token of a request retracted or aborted meanwhile).
  - a slot or req_to_token row freed while a batch is in flight may go to the next batch at
    once: its new owner writes it in that later batch, after the in-flight batch is done with
    it, and what the in-flight batch reads there only feeds a skipped row.
  - requests whose prefill completes join ``running`` at the launch of their extend batch, so
    the next decode batch includes them. A request whose last token N has not returned yet
    feeds N's future placeholder (core/scheduler/future_tokens.py) and its sampling position
    counts that token.

Sync points: batch N is completed before N+1 is scheduled when
  - N has a request with a grammar: its next mask needs N's token (serialized, the simple way;
    SGLang instead lets the worker wait for the mask);
  - N has a request with penalties or min_new_tokens: their host-side state (rebuilt when the
    batch's requests change) must include N's tokens;
  - N has a request with a thinking budget: its token may be overwritten on the host;
  - N is an extend batch with an unfinished chunk: the next chunk starts from the prefix that
    N's results cache (cache_unfinished_req).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch


@dataclass
class InFlight:
    step: Any                      # the executor's handle (LaunchedStep / FinishedStep)
    batch: ScheduleBatch
    rows: list[Optional[int]]      # [B] each request's req_to_token row at launch
    kv_tokens: dict[int, int]      # id(req) -> KV tokens this batch computes for it, until completed
    futures: dict[int, int]        # id(req) -> placeholder of the token this batch samples for it
    sync_point: bool               # grammar / penalty requests (see the module docstring)

    def is_sync_point(self) -> bool:
        batch = self.batch
        unfinished_chunk = batch.mode.is_extend() and len(batch.sample_req_idx) < len(batch.reqs)
        return unfinished_chunk or self.sync_point

    def owned(self) -> list[int]:
        """Indices of the batch's requests not released since its launch."""
        return [i for i, r in enumerate(self.batch.reqs)
                if r.req_pool_idx is not None and r.req_pool_idx == self.rows[i] and not r.finished()]


def needs_host_state(req: Req) -> bool:
    """Whether sampling the request's next token needs the host to have processed its last."""
    p = req.sampling_params
    return (req.grammar is not None or p.frequency_penalty != 0 or p.presence_penalty != 0
            or p.repetition_penalty != 1.0 or p.min_new_tokens > 0
            or p.thinking_budget is not None)  # it may overwrite the sampled token
