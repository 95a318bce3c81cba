"""Scheduler: continuous batching over the paged KV pool with a prefix cache.

Each ``step()``: admit waiting requests into one prefill (extend) batch if any can run, else
decode every running request by one token; run it on the ModelRunner; turn the sampled ids into
ReqUpdates. The scheduler owns every Req and every KV slot decision; the runner only computes.
It knows nothing about sockets (scheduler_process.py wires it to ZMQ), so tests drive it directly.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.grammar import GrammarError, grammar_spec
from kvyard.io_struct import ReqUpdate, TokenizedGenerateReq
from kvyard.mem_cache.chunk_cache import ChunkCache
from kvyard.mem_cache.integrity import check_kv_integrity
from kvyard.mem_cache.radix_cache import RadixCache
from kvyard.req import FinishReason, Req
from kvyard.schedule_batch import ScheduleBatch, StepResult
from kvyard.schedule_policy import order_waiting
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.stop_checker import StopChecker

logger = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.01  # idle wait for a compiling grammar when nothing else can run


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int
    context_length: int
    chunked_prefill_size: int = -1         # -1: no chunking
    max_prefill_tokens: int = 16384
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    disable_radix_cache: bool = False
    stream_interval: int = 1
    random_seed: Optional[int] = None
    debug_kv_integrity: bool = False
    max_queued_requests: Optional[int] = None
    enable_overlap: bool = False           # OverlapScheduler (core/overlap_scheduler.py) when True


class Scheduler:
    def __init__(self, config: SchedulerConfig, runner, eos_token_ids: list[int],
                 tokenizer_factory: Callable[[], object] | None = None, grammar=None):
        self.config = config
        self.grammar = grammar  # kvyard.grammar_manager.GrammarManager, None when grammars are off
        self.runner = runner
        self.allocator = runner.allocator
        self.req_to_token = runner.req_to_token
        self.page_size = self.allocator.page_size
        cache_cls = ChunkCache if config.disable_radix_cache else RadixCache
        self.cache = cache_cls(self.allocator, self.req_to_token, self.page_size)
        self.stop_checker = StopChecker(eos_token_ids, tokenizer_factory)
        self.vocab_size = runner.model_config.vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Optional[Req] = None
        self.rng = random.Random(config.random_seed)
        self._decode_info: Optional[SamplingBatchInfo] = None
        self._decode_rids: tuple = ()
        self._pending_updates: list[ReqUpdate] = []  # finishes decided outside _process (aborts on retraction)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0, "retractions": 0}

    # -- requests in ------------------------------------------------------------------------
    def add_request(self, msg: TokenizedGenerateReq) -> Optional[ReqUpdate]:
        req = Req(rid=msg.rid, origin_input_ids=list(msg.input_ids), sampling_params=msg.sampling_params,
                  return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
                  logprob_start_len=msg.logprob_start_len, stream=msg.stream, priority=msg.priority,
                  arrival=time.monotonic(), sampling_seed=msg.sampling_seed, embed=msg.embed,
                  token_type_ids=msg.token_type_ids)
        problem = self._reject_reason(req)
        if problem is None and self.config.max_queued_requests is not None \
                and len(self.waiting) >= self.config.max_queued_requests:
            problem = f"the queue is full ({self.config.max_queued_requests} waiting requests); retry later"
        if problem:
            req.finished_reason = FinishReason("abort", message=problem)
            return self._update(req)
        if self.grammar is not None:
            self.grammar.start(req)  # compiles off the critical path; the request waits meanwhile
        self.waiting.append(req)
        return None

    def _reject_reason(self, req: Req) -> Optional[str]:
        n = len(req.origin_input_ids)
        if n == 0:
            return "input_ids: the prompt is empty"
        if n >= self.config.context_length:
            return f"input_ids: the prompt has {n} tokens; the context length is {self.config.context_length}"
        if n + 1 > self.runner.max_total_tokens:
            return f"input_ids: the prompt has {n} tokens; the KV pool holds {self.runner.max_total_tokens}"
        if self.grammar is None and grammar_spec(req.sampling_params) is not None:
            return f"{grammar_spec(req.sampling_params)[0]}: structured output is disabled (--grammar-backend none)"
        return None

    def abort(self, rid: str) -> list[ReqUpdate]:
        """Aborts one request ("" = all); frees its slots. Called between steps only."""
        updates = []
        for req in [r for r in self.waiting if rid in ("", r.rid)]:
            self.waiting.remove(req)
            req.finished_reason = FinishReason("abort", message="aborted")
            updates.append(self._update(req))
        for req in [r for r in self._active() if rid in ("", r.rid)]:
            self._release(req, insert=True)
            req.finished_reason = FinishReason("abort", message="aborted")
            updates.append(self._update(req))
        return updates

    def _active(self) -> list[Req]:
        return self.running + ([self.chunked_req] if self.chunked_req else [])

    def _release(self, req: Req, insert: bool) -> None:
        if req is self.chunked_req:
            self.chunked_req = None
        if req in self.running:
            self.running.remove(req)
        if req.req_pool_idx is not None:
            self.cache.release_req(req, insert=insert)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req)

    def finish_inflight(self) -> list[ReqUpdate]:
        """Results of steps launched but not yet processed (none here: ``step`` runs each batch to
        its end; OverlapScheduler overrides it). Call before touching the runner from outside."""
        return []

    def close(self) -> None:
        """Stops helper threads (none here)."""

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[ReqUpdate]:
        batch = self._schedule_extend() or self._schedule_decode()
        if batch is None:
            if self.grammar is not None and self.waiting:
                self.grammar.wait_for_compile(GRAMMAR_WAIT_S)
            return self._drain_pending()
        self._advance_kv(batch)
        if self.grammar is not None:
            self.grammar.apply_masks(batch)
        try:
            result = self.runner.forward(batch)
        except Exception as exc:  # fail this batch's requests, keep serving the rest
            logger.exception("a %s step failed", batch.mode.name.lower())
            return self._fail_batch(batch, f"internal error: {type(exc).__name__}: {exc}")
        updates = self._process(batch, result)
        if self.config.debug_kv_integrity:
            self.check_integrity()
        return updates

    def check_integrity(self) -> None:
        check_kv_integrity(self.allocator, self.cache, self._active(), self.req_to_token)

    @staticmethod
    def _advance_kv(batch: ScheduleBatch) -> None:
        """The batch's slots now count as its requests' KV (computed by the forward that follows)."""
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n

    # -- extend (prefill) -------------------------------------------------------------------
    def _schedule_extend(self) -> Optional[ScheduleBatch]:
        if not self.waiting and self.chunked_req is None:
            return None
        chunk = self.config.chunked_prefill_size
        budget = self.config.max_prefill_tokens if chunk <= 0 else min(chunk, self.config.max_prefill_tokens)
        batch = _ExtendBuilder()
        if self.chunked_req is not None:
            req = self.chunked_req
            self.chunked_req = None
            budget -= self._add_extend(batch, req, budget, chunk)
        free_budget = self._admission_budget()
        for req in order_waiting(self.config.schedule_policy, self.waiting, self._peek_match, self.rng):
            if budget <= 0 or len(self.running) + len(batch.reqs) >= self.runner.max_running_requests:
                break
            if batch.reqs and batch.reqs[0].embed != req.embed:
                break  # embedding and generation requests do not share a batch
            if not self._grammar_ready(req):
                continue
            need = self._extend_need(req)
            if need > free_budget and (batch.reqs or self.running):
                break  # admitting it would only force retractions of the running requests
            if not self._admit(req):
                break
            self.waiting.remove(req)
            used = self._add_extend(batch, req, budget, chunk)
            if used == 0:
                break
            budget -= used
            free_budget -= need
        return batch.finish(self) if batch.reqs else None

    def _grammar_ready(self, req: Req) -> bool:
        """False while the request's grammar compiles (it keeps its place in the queue); a
        grammar that failed to compile aborts the request."""
        if req.grammar is None:
            return True
        try:
            return self.grammar.activate(req)
        except GrammarError as exc:
            self.waiting.remove(req)
            req.finished_reason = FinishReason("abort", message=str(exc))
            self._pending_updates.append(self._update(req))
            return False

    def _peek_match(self, req: Req):
        m = self.cache.match_prefix(self._match_key(req))
        return len(m.indices), m.last_node

    def _match_key(self, req: Req) -> list[int]:
        ids = req.all_ids
        limit = len(ids) - 1  # keep at least one token to compute logits from
        if req.return_logprob and req.logprob_start_len >= 0:
            limit = min(limit, req.logprob_start_len)
        if req.embed:
            limit = 0
        return ids[:max(0, limit)]

    def _admission_budget(self) -> int:
        """Free tokens minus a reserve for the running requests' future decode tokens."""
        ratio = min(1.0, 0.3 * self.config.schedule_conservativeness)
        reserve = sum(min(r.sampling_params.max_new_tokens - len(r.output_ids), 4096) for r in self.running)
        return self.allocator.available() + self.cache.evictable_size() - int(reserve * ratio)

    def _extend_need(self, req: Req) -> int:
        ratio = min(1.0, 0.3 * self.config.schedule_conservativeness)
        return len(req.all_ids) + int(min(req.sampling_params.max_new_tokens, 4096) * ratio)

    def _admit(self, req: Req) -> bool:
        """Gives the request a req_to_token row and its cached prefix (locked)."""
        row = self.req_to_token.alloc()
        if row is None:
            return False
        match = self.cache.match_prefix(self._match_key(req))
        self.cache.inc_lock_ref(match.last_node)
        req.req_pool_idx, req.last_node = row, match.last_node
        req.prefix_indices = match.indices
        req.kv_len = len(match.indices)
        if req.retractions == 0:
            req.cached_tokens = req.kv_len
        if req.kv_len:
            self.req_to_token.write(row, 0, match.indices)
        return True

    def _add_extend(self, batch: "_ExtendBuilder", req: Req, budget: int, chunk: int) -> int:
        remaining = len(req.all_ids) - req.kv_len
        # encoders need the whole prompt in one step
        n = remaining if chunk <= 0 or req.embed else min(remaining, max(budget, 1))
        slots = self._alloc(req, n)
        if slots is None:  # no memory even after eviction: back to the queue
            self._release(req, insert=False)
            req.kv_len, req.prefix_indices, req.last_node = 0, torch.empty(0, dtype=torch.int64), None
            self.waiting.insert(0, req)
            return 0
        batch.add(req, slots, n)
        return n

    def _alloc(self, req: Req, n: int) -> Optional[torch.Tensor]:
        last_loc = int(self.req_to_token.table[req.req_pool_idx, req.kv_len - 1]) if req.kv_len else 0
        need = self.allocator.pages_needed(req.kv_len, n) * self.page_size
        if self.allocator.available() < need:
            self.cache.evict(need - self.allocator.available())
        slots = self.allocator.alloc_for_req(req.kv_len, last_loc, n)
        if slots is not None:
            self.req_to_token.write(req.req_pool_idx, req.kv_len, slots)
        return slots

    # -- decode -----------------------------------------------------------------------------
    def _schedule_decode(self) -> Optional[ScheduleBatch]:
        while self.running and not self._reserve_decode_slots():
            self._retract_one()
        if not self.running:
            return None
        reqs = list(self.running)
        slots = self._alloc_decode(reqs)
        batch = ScheduleBatch(
            mode=ForwardMode.DECODE, reqs=reqs, input_ids=[self._input_token(r) for r in reqs],
            positions=[r.kv_len for r in reqs], out_cache_loc=slots,
            prefix_lens=[r.kv_len for r in reqs], extend_lens=[1] * len(reqs),
            sample_rows=list(range(len(reqs))), sample_req_idx=list(range(len(reqs))))
        batch.sampling_info = self._decode_sampling_info(reqs)
        return batch

    def _alloc_decode(self, reqs: list[Req]) -> torch.Tensor:
        """int64 [B] one new slot per running request, in one allocation and one table write
        (per-request calls cost a few tensor ops each: at batch 128 that was most of a step).
        _reserve_decode_slots made room first."""
        rows = [r.req_pool_idx for r in reqs]
        positions = [r.kv_len for r in reqs]
        last_locs = None
        if self.page_size > 1:
            last_locs = self.req_to_token.read_tokens(rows, [p - 1 for p in positions])
        slots = self.allocator.alloc_decode(positions, last_locs)
        assert slots is not None, "decode slots were reserved before allocation"
        self.req_to_token.write_tokens(rows, positions, slots)
        return slots

    def _input_token(self, req: Req) -> int:
        """The token a decode step feeds for ``req``: its last output token."""
        return req.output_ids[-1]

    def _reserve_decode_slots(self) -> bool:
        need = sum(self.allocator.pages_needed(r.kv_len, 1) for r in self.running) * self.page_size
        if self.allocator.available() < need:
            self.cache.evict(need - self.allocator.available())
        return self.allocator.available() >= need

    def _retract_one(self) -> None:
        victim = max(self.running, key=lambda r: r.arrival)
        self._release(victim, insert=True)
        victim.kv_len, victim.prefix_indices, victim.last_node = 0, torch.empty(0, dtype=torch.int64), None
        if not self.running and not self.waiting and self.allocator.available() + self.cache.evictable_size() < len(victim.all_ids):
            victim.finished_reason = FinishReason("abort", message="the KV pool is too small for this request")
            self._pending_updates.append(self._update(victim))
            return
        victim.retractions += 1
        self.stats["retractions"] += 1
        self.waiting.insert(0, victim)
        logger.info("retracted request %s (KV pool short); it will resume", victim.rid)

    def _decode_sampling_info(self, reqs: list[Req]) -> SamplingBatchInfo:
        rids = tuple(r.rid for r in reqs)
        if rids != self._decode_rids or self._decode_info is None:
            self._decode_info = SamplingBatchInfo.from_reqs(reqs, self.vocab_size, self.runner.device,
                                                            eos_token_ids=self.eos_token_ids)
            self._decode_rids = rids
        return self._decode_info

    # -- results ----------------------------------------------------------------------------
    def _process(self, batch: ScheduleBatch, result: StepResult) -> list[ReqUpdate]:
        updates = self._drain_pending()
        if result.embeddings is not None:
            return updates + self._finish_embeddings(batch, result)
        self._collect_input_logprobs(batch, result)
        self._record_sampled(batch, result.next_ids)
        sampled = set()
        for k, (i, token) in enumerate(zip(batch.sample_req_idx, result.next_ids)):
            req = batch.reqs[i]
            sampled.add(i)
            if req.sampling_params.max_new_tokens == 0:
                req.finished_reason = FinishReason("length")
                continue
            req.output_ids.append(token)
            self.stats["generation_tokens"] += 1
            if req.return_logprob and result.logprobs is not None:
                req.output_token_logprobs.append((result.logprobs[k], token))
                if result.top_logprobs is not None:
                    req.output_top_logprobs.append(result.top_logprobs[k])
            req.finished_reason = self.stop_checker.check(req, self.config.context_length)
            if req.grammar is not None:
                req.finished_reason = self.grammar.after_token(req, token, req.finished_reason)
        for i, req in enumerate(batch.reqs):
            if i not in sampled:  # a chunk of a longer prefill: keep going next step
                self.cache.cache_unfinished_req(req)
                self.chunked_req = req
                continue
            if batch.mode.is_extend():
                self.stats["prompt_tokens"] += len(req.origin_input_ids) if req.retractions == 0 else 0
                self.stats["cached_tokens"] += req.cached_tokens if req.retractions == 0 else 0
            if req.finished():
                self._release(req, insert=True)
            elif batch.mode.is_extend():
                self._start_running(req)
            update = self._maybe_update(req)
            if update:
                updates.append(update)
        return updates

    def _record_sampled(self, batch: ScheduleBatch, next_ids: list[int]) -> None:
        """Penalty state of the running decode batch follows the tokens it just sampled."""
        if batch.mode.is_decode() and batch.sampling_info is not None:
            batch.sampling_info.update_after_step(torch.tensor(next_ids, device=self.runner.device))

    def _start_running(self, req: Req) -> None:
        """A request whose prefill completed joins the decode batch."""
        self.running.append(req)

    def _fail_batch(self, batch: ScheduleBatch, message: str) -> list[ReqUpdate]:
        """Aborts every request of a step that raised. Their slots for this step were allocated
        (and counted in kv_len by ``_advance_kv``), so they are owned until this release; nothing
        is inserted into the cache (the step's KV was never computed)."""
        updates = self._drain_pending()
        for req in batch.reqs:
            self._release(req, insert=False)
            req.finished_reason = FinishReason("abort", message=message)
            updates.append(self._update(req))
        self._decode_rids = ()
        return updates

    def _drain_pending(self) -> list[ReqUpdate]:
        out, self._pending_updates = list(self._pending_updates), []
        return out

    def _collect_input_logprobs(self, batch: ScheduleBatch, result: StepResult) -> None:
        if not batch.input_logprob_rows or result.input_logprobs is None:
            return
        for k, (i, _, target) in enumerate(batch.input_logprob_rows):
            req = batch.reqs[i]
            req.input_token_logprobs.append((result.input_logprobs[k], target))
            if result.input_top_logprobs is not None:
                req.input_top_logprobs.append(result.input_top_logprobs[k][:req.top_logprobs_num])

    def _finish_embeddings(self, batch: ScheduleBatch, result: StepResult) -> list[ReqUpdate]:
        updates = []
        for req, vec in zip(batch.reqs, result.embeddings):
            req.finished_reason = FinishReason("length")
            self._release(req, insert=False)
            update = self._update(req)
            update.embedding = vec.tolist()
            updates.append(update)
        return updates

    def _maybe_update(self, req: Req) -> Optional[ReqUpdate]:
        unsent = len(req.output_ids) - req.sent_len
        if req.finished() or (req.stream and (req.sent_len == 0 or unsent >= self.config.stream_interval)):
            return self._update(req)
        return None

    def _update(self, req: Req) -> ReqUpdate:
        start = req.sent_len
        update = ReqUpdate(
            rid=req.rid, new_token_ids=req.output_ids[start:],
            finished_reason=req.finished_reason.to_dict() if req.finished_reason else None,
            prompt_tokens=len(req.origin_input_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            output_token_logprobs=req.output_token_logprobs[start:],
            output_top_logprobs=req.output_top_logprobs[start:])
        if req.return_logprob and not req.input_logprobs_sent and (req.finished() or start == 0 and req.output_ids):
            update.input_token_logprobs = _with_first_none(req)
            update.input_top_logprobs = req.input_top_logprobs
            req.input_logprobs_sent = True
        req.sent_len = len(req.output_ids)
        return update

    # -- control ----------------------------------------------------------------------------
    def load_info(self) -> dict:
        total = self.runner.max_total_tokens
        used = total - self.allocator.available() - self.cache.evictable_size()
        prompt = self.stats["prompt_tokens"]
        return {"num_running_reqs": len(self.running) + (1 if self.chunked_req else 0),
                "num_queue_reqs": len(self.waiting), "token_usage": used / total if total else 0.0,
                "cache_hit_rate": self.stats["cached_tokens"] / prompt if prompt else 0.0, **self.stats}

    def flush_cache(self) -> bool:
        if self.has_work():
            return False
        self.cache.reset()
        return True


def _with_first_none(req: Req) -> list:
    """Prompt logprobs as SGLang returns them: the first prompt token has no logprob."""
    out = list(req.input_token_logprobs)
    if req.logprob_start_len == 0 and req.origin_input_ids:
        out.insert(0, (None, req.origin_input_ids[0]))
    return out


class _ExtendBuilder:
    """Accumulates the flat inputs of one extend batch."""

    def __init__(self):
        self.reqs: list[Req] = []
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.slots: list[torch.Tensor] = []
        self.prefix_lens: list[int] = []
        self.extend_lens: list[int] = []
        self.sample_rows: list[int] = []
        self.sample_req_idx: list[int] = []
        self.input_logprob_rows: list[tuple[int, int, int]] = []

    def add(self, req: Req, slots: torch.Tensor, n: int) -> None:
        i, start, ids = len(self.reqs), len(self.input_ids), req.all_ids
        begin = req.kv_len
        self.reqs.append(req)
        self.input_ids += ids[begin:begin + n]
        self.positions += range(begin, begin + n)
        self.slots.append(slots)
        self.prefix_lens.append(begin)
        self.extend_lens.append(n)
        if req.return_logprob and req.logprob_start_len >= 0:
            # row j predicts token j + 1; prompt logprobs cover prompt tokens after logprob_start_len,
            # each once (the re-prefill of a retracted request skips those it already has)
            prompt_len = len(req.origin_input_ids)
            first = max(begin, req.logprob_start_len + len(req.input_token_logprobs))
            for pos in range(first, min(begin + n, prompt_len - 1)):
                self.input_logprob_rows.append((i, start + pos - begin, ids[pos + 1]))
        if begin + n == len(ids):
            self.sample_rows.append(start + n - 1)
            self.sample_req_idx.append(i)

    def finish(self, scheduler: Scheduler) -> ScheduleBatch:
        batch = ScheduleBatch(
            mode=ForwardMode.EXTEND, reqs=self.reqs, input_ids=self.input_ids, positions=self.positions,
            out_cache_loc=torch.cat(self.slots), prefix_lens=self.prefix_lens, extend_lens=self.extend_lens,
            sample_rows=self.sample_rows, sample_req_idx=self.sample_req_idx,
            input_logprob_rows=self.input_logprob_rows)
        sample_reqs = [self.reqs[i] for i in self.sample_req_idx]
        if sample_reqs and not self.reqs[0].embed:
            batch.sampling_info = SamplingBatchInfo.from_reqs(
                sample_reqs, scheduler.vocab_size, scheduler.runner.device,
                eos_token_ids=scheduler.eos_token_ids)
        return batch
