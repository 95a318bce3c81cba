"""Scheduler: continuous batching over the paged KV pool with a prefix cache.

Each ``step()``: complete the batch in flight if it is a sync point, schedule the next batch —
admit waiting requests into one prefill (extend) batch if any can run, else decode every running
request by one token — launch it on the executor, then complete the batch launched before it
(turn its sampled ids into ReqUpdates: core/scheduler/output_processor.py). The executor is a
SyncExecutor (launch runs the step; it is completed in the same ``step()``) or, with overlap
scheduling, an OverlapWorker (the step runs on a worker thread while the next one is scheduled);
the bookkeeping of the batch in flight and its invariants are in core/scheduler/inflight.py.
A small decode batch with nothing waiting may run several decode steps in one ``step()``
(continuous decode, core/scheduler/continuous_decode.py).
The scheduler owns every Req and every KV slot decision; the runner only computes. It knows
nothing about sockets (core/scheduler/process.py wires it to ZMQ), so tests drive it directly.
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
from kvyard.mem_cache.chunk_cache import ChunkCache
from kvyard.mem_cache.integrity import check_kv_integrity
from kvyard.mem_cache.radix_cache import RadixCache
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.scheduler.continuous_decode import ContinuousDecodeMixin
from kvyard.scheduler.extend_builder import ExtendBatchBuilder
from kvyard.scheduler.future_tokens import FutureTokenMap
from kvyard.scheduler.inflight import InFlight, needs_host_state
from kvyard.scheduler.io_struct import ReqUpdate, TokenizedGenerateReq
from kvyard.scheduler.output_processor import OutputProcessorMixin
from kvyard.scheduler.req import FinishReason, Req
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult
from kvyard.scheduler.schedule_policy import order_waiting
from kvyard.scheduler.step_log import StepLog
from kvyard.scheduler.stop_checker import StopChecker

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
    enable_overlap: bool = False           # an OverlapWorker executor instead of the SyncExecutor
    enable_mixed_chunk: bool = False       # running requests decode inside extend batches
    prefill_max_requests: Optional[int] = None   # most requests one extend batch prefills (None: no cap)
    priority_sign: int = 0                 # priority scheduling: +1 higher values first, -1 lower, 0 off
    decode_log_interval: int = 0           # a "Decode batch" log line every N decode batches (0: none)
    show_time_cost: bool = False           # stage timings with each log line (core/scheduler/step_log.py)
    num_continuous_decode_steps: int = 1   # most decode steps of a small batch per iteration (continuous_decode.py)


class Scheduler(OutputProcessorMixin, ContinuousDecodeMixin):
    def __init__(self, config: SchedulerConfig, runner, eos_token_ids: list[int],
                 tokenizer_factory: Callable[[], object] | None = None, grammar=None, speculation=None):
        self.config = config
        self.grammar = grammar  # kvyard.grammar.manager.GrammarManager, None when grammars are off
        self.speculation = speculation  # kvyard.scheduler.speculation.Speculation, None when off
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
        self.executor = self._make_executor()
        self._inflight: Optional[InFlight] = None
        self.step_log = StepLog(config.decode_log_interval, config.show_time_cost)

    def _make_executor(self):
        if not self.config.enable_overlap:
            from kvyard.executor.sync_executor import SyncExecutor
            return SyncExecutor(self.runner)
        from kvyard.executor.overlap_worker import OverlapWorker
        return OverlapWorker(self.runner, FutureTokenMap(self.runner.max_running_requests, self.runner.device))

    # -- requests in ------------------------------------------------------------------------
    def add_request(self, msg: TokenizedGenerateReq) -> Optional[ReqUpdate]:
        req = Req(rid=msg.rid, origin_input_ids=list(msg.input_ids), sampling_params=msg.sampling_params,
                  return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
                  logprob_start_len=msg.logprob_start_len, stream=msg.stream, priority=msg.priority,
                  arrival=time.monotonic(), sampling_seed=msg.sampling_seed, embed=msg.embed,
                  token_type_ids=msg.token_type_ids, return_hidden_states=msg.return_hidden_states,
                  lora_name=msg.lora_name)
        problem = self._reject_reason(req) or self._lora_reject_reason(req)
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
        if req.return_hidden_states and self.speculation is not None:
            return "return_hidden_states: not supported with speculative decoding"
        if self.grammar is None and grammar_spec(req.sampling_params) is not None:
            return f"{grammar_spec(req.sampling_params)[0]}: structured output is disabled (--grammar-backend none)"
        return None

    def _lora_reject_reason(self, req: Req) -> Optional[str]:
        """Checks the request's adapter and sets its prefix-cache namespace."""
        if req.lora_name is None:
            return None
        lora = self.runner.lora
        if lora is None:
            return "lora_path: LoRA serving is off (start the server with --enable-lora)"
        if req.lora_name not in lora.adapters:
            return f"lora_path: unknown LoRA adapter {req.lora_name!r}"
        req.cache_namespace = lora.uid[req.lora_name]
        return None

    def _acquire_lora(self, req: Req) -> bool:
        """Pins a slot for the request's adapter; False holds it back (every slot is pinned by
        other adapters' requests this step)."""
        lora = self.runner.lora
        if lora is None:
            return True
        slot = lora.acquire(req.lora_name)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _release_lora(self, req: Req) -> None:
        if req.lora_slot is not None:
            self.runner.lora.release(req.lora_slot)
            req.lora_slot = None

    def lora_users(self, name: str) -> int:
        """Requests (waiting, running or in flight) that use adapter ``name``."""
        return sum(1 for r in self.waiting + self._active() if r.lora_name == name)

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
        """Requests owning KV: running, the prefill chunk, and those only the batch in flight
        holds (a prefill chunk, max_new_tokens=0)."""
        active = self.running + ([self.chunked_req] if self.chunked_req else [])
        if self._inflight is not None:
            known = {id(r) for r in active}
            active += [r for r in self._inflight.batch.reqs if r.req_pool_idx is not None and id(r) not in known]
        return active

    def _release(self, req: Req, insert: bool) -> None:
        inflight = self._inflight
        pending = inflight.kv_tokens.pop(id(req), 0) if inflight is not None else 0
        if pending and req.req_pool_idx is not None:
            self._give_back_kv(req, pending)
        if req is self.chunked_req:
            self.chunked_req = None
        if req in self.running:
            self.running.remove(req)
        if req.req_pool_idx is not None:
            self.cache.release_req(req, insert=insert)
        self._release_lora(req)
        if self.speculation is not None:
            self.speculation.release(req.rid)

    def _give_back_kv(self, req: Req, n: int, slots: Optional[torch.Tensor] = None, end: int = 0) -> None:
        """Drops the last n KV tokens (not computed yet) of a request: frees the pages only they
        use (the page of the last kept token stays with the request) and shortens kv_len.
        slots: int64 host, whose entries before ``end`` hold the slots of the request's last
        positions as allocated (a verify batch's out_cache_loc): then nothing is read back from
        the req_to_token table on the device."""
        keep = req.kv_len - n
        first_free = -(-keep // self.page_size) * self.page_size
        if first_free < req.kv_len:
            if slots is not None:
                freed = slots[end - (req.kv_len - first_free):end]
            else:
                freed = self.req_to_token.table[req.req_pool_idx, first_free:req.kv_len].to(torch.int64)
            self.allocator.free(freed)
        req.kv_len = keep

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req) or self._inflight is not None

    def finish_inflight(self) -> list[ReqUpdate]:
        """Completes the batch in flight, if any. Call before touching the runner from outside."""
        prev, self._inflight = self._inflight, None
        updates = self._complete(prev) if prev is not None else []
        return updates + self._drain_pending()

    def close(self) -> None:
        """Stops the executor's thread (overlap) and the speculative algorithm."""
        self.executor.close()
        if self.speculation is not None:
            self.speculation.close()

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[ReqUpdate]:
        updates: list[ReqUpdate] = []
        prev, stage = self._inflight, self.step_log.stage
        if prev is not None and prev.is_sync_point():
            with stage("complete"):
                updates += self.finish_inflight()
            prev = None
        with stage("schedule"):
            batch = self._schedule_extend() or self._schedule_decode()
        with stage("launch"):
            if batch is not None and batch.num_steps > 1:
                updates += self._run_steps(batch)   # launched and completed here, step by step
            elif batch is not None:
                updates += self._launch(batch)   # the batch in flight from now on (None if it failed)
            else:
                self._inflight = None
        with stage("complete"):
            if prev is not None:
                updates += self._complete(prev)
            elif batch is None and self.grammar is not None and self.waiting:
                self.grammar.wait_for_compile(GRAMMAR_WAIT_S)
            if not self.config.enable_overlap:
                updates += self.finish_inflight()    # launch-then-complete at once
        updates += self._drain_pending()
        self.step_log.after_step(batch, self.load_info)
        if self.config.debug_kv_integrity:
            self.check_integrity()
        return updates

    def check_integrity(self) -> None:
        check_kv_integrity(self.allocator, self.cache, self._active(), self.req_to_token)

    # -- launch and complete ------------------------------------------------------------------
    def _launch(self, batch: ScheduleBatch) -> list[ReqUpdate]:
        """Hands the batch to the executor and makes it the batch in flight. Its slots count as
        its requests' KV from now on; a batch that cannot even be prepared fails its requests."""
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n
        prev = self._inflight
        pending = prev.futures if prev is not None else {}
        sampled = [batch.reqs[i] for i in batch.sample_req_idx]
        positions = [r.seq_len + (id(r) in pending) + batch.sample_offset(k) for k, r in enumerate(sampled)]
        try:
            if self.grammar is not None:
                self.grammar.apply_masks(batch)
            step = self.executor.launch(batch, positions)
        except Exception as exc:
            logger.exception("preparing a %s step failed", batch.mode.name.lower())
            updates = self._fail_batch(batch, f"internal error: {type(exc).__name__}: {exc}")
            self._inflight = None   # after the release above gave back the KV it had in flight
            return updates
        futures = {} if step.future_start is None or batch.is_verify else {
            id(r): FutureTokenMap.placeholder(step.future_start, k) for k, r in enumerate(sampled)}
        # with speculation every step is a sync point: the next drafts need this step's tokens
        self._inflight = InFlight(
            step, batch, rows=[r.req_pool_idx for r in batch.reqs],
            kv_tokens={id(r): n for r, n in zip(batch.reqs, batch.extend_lens)}, futures=futures,
            sync_point=self.speculation is not None or any(needs_host_state(r) for r in batch.reqs))
        if batch.mode.is_extend() and not batch.is_verify:   # mixed decodes are running already
            self.running += [r for i, r in zip(batch.sample_req_idx, sampled)
                             if r.sampling_params.max_new_tokens > 0 and not r.embed and not batch.is_mixed_decode(i)]
        return []

    def _complete(self, inflight: InFlight) -> list[ReqUpdate]:
        """Waits for a launched batch and processes its results for the requests it still owns."""
        try:
            result = self.executor.wait(inflight.step)
        except Exception as exc:  # fail this batch's requests, keep serving the rest
            logger.error("a %s step failed", inflight.batch.mode.name.lower(), exc_info=exc)
            inflight.kv_tokens.clear()
            batch, _, _, _ = inflight.batch.select(inflight.owned())
            return self._fail_batch(batch, f"internal error: {type(exc).__name__}: {exc}")
        inflight.kv_tokens.clear()          # computed: a release from now on keeps it
        if inflight.sync_point:             # the next batch is scheduled after this update
            self._record_sampled(inflight.batch, result.next_ids)
        batch, keep = inflight.batch, inflight.owned()
        if self.speculation is not None:    # a draft head reads the target's hidden states first
            self.speculation.observe(batch, result, keep)
        if len(keep) < len(batch.reqs) and result.embeddings is None:
            batch, samples, inputs, hiddens = batch.select(keep)
            result = result.select(samples, inputs, hiddens)
        if batch.is_verify:
            return self._process_verify(batch, result)
        return self._process(batch, result)

    def _record_sampled(self, batch: ScheduleBatch, next_ids: list[int]) -> None:
        """Penalty state of the decode batch follows the tokens it just sampled (sync points only:
        other batches have no penalty state, and the batch launched meanwhile may share this one's
        SamplingBatchInfo)."""
        if batch.mode.is_decode() and batch.sampling_info is not None:
            batch.sampling_info.update_after_step(torch.tensor(next_ids, device=self.runner.device))

    # -- extend (prefill) -------------------------------------------------------------------
    def _schedule_extend(self) -> Optional[ScheduleBatch]:
        if not self.waiting and self.chunked_req is None:
            return None
        chunk = self.config.chunked_prefill_size
        budget = self.config.max_prefill_tokens if chunk <= 0 else min(chunk, self.config.max_prefill_tokens)
        batch = ExtendBatchBuilder()
        if self.chunked_req is not None:
            req = self.chunked_req
            self.chunked_req = None
            budget -= self._add_extend(batch, req, budget, chunk)
        free_budget = self._admission_budget()
        for req in order_waiting(self.config.schedule_policy, self.waiting, self._peek_match, self.rng,
                                 self.config.priority_sign):
            if budget <= 0 or len(self.running) + len(batch.reqs) >= self.runner.max_running_requests:
                break
            if self.config.prefill_max_requests is not None and len(batch.reqs) >= self.config.prefill_max_requests:
                break
            if batch.reqs and batch.reqs[0].embed != req.embed:
                break  # embedding and generation requests do not share a batch
            if not self._grammar_ready(req):
                continue
            need = self._extend_need(req)
            if need > free_budget and (batch.reqs or self.running):
                break  # admitting it would only force retractions of the running requests
            if not self._acquire_lora(req):
                continue  # its adapter gets no slot this step: it waits, later requests may run
            if not self._admit(req):
                self._release_lora(req)
                break
            self.waiting.remove(req)
            used = self._add_extend(batch, req, budget, chunk)
            if used == 0:
                break
            budget -= used
            free_budget -= need
        if not batch.reqs:
            return None
        if self.config.enable_mixed_chunk:
            self._mix_running(batch)
        return batch.finish(self.vocab_size, self.runner.device, self.eos_token_ids)

    def _mix_running(self, batch: ExtendBatchBuilder) -> None:
        """--enable-mixed-chunk: every running request decodes its next token in this extend
        batch (one forward instead of a prefill step that stalls them), when their slots fit
        without retracting anyone; otherwise the next decode batch takes them as usual."""
        if not self.running or batch.reqs[0].embed or self.speculation is not None \
                or not self._reserve_decode_slots():
            return
        reqs = list(self.running)
        batch.add_decodes(reqs, self._alloc_decode(reqs), [self._input_token(r) for r in reqs])
        self._decode_rids = ()   # the cached decode sampling info misses the tokens this batch samples

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
        m = self.cache.match_prefix(self._match_key(req), req.cache_namespace)
        return len(m.indices), m.last_node

    def _match_key(self, req: Req) -> list[int]:
        ids = req.all_ids
        limit = len(ids) - 1  # keep at least one token to compute logits from
        if req.return_logprob and req.logprob_start_len >= 0:
            limit = min(limit, req.logprob_start_len)
        if req.return_hidden_states:   # positions past hidden_len must be computed to be returned
            limit = min(limit, req.hidden_len)
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
        match = self.cache.match_prefix(self._match_key(req), req.cache_namespace)
        self.cache.inc_lock_ref(match.last_node)
        req.req_pool_idx, req.last_node = row, match.last_node
        req.prefix_indices = match.indices
        req.kv_len = len(match.indices)
        if req.retractions == 0:
            req.cached_tokens = req.kv_len
        if req.kv_len:
            self.req_to_token.write(row, 0, match.indices)
        return True

    def _add_extend(self, batch: ExtendBatchBuilder, req: Req, budget: int, chunk: int) -> int:
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
        # the slot before is read (a device-to-host copy) only where it has a partly filled page
        last_loc = int(self.req_to_token.table[req.req_pool_idx, req.kv_len - 1]) \
            if req.kv_len and self.page_size > 1 else 0
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
        if self.speculation is not None:
            verify = self._schedule_verify(reqs)
            if verify is not None:
                return verify
        steps = self._continuous_steps(reqs)
        step_slots = self._alloc_steps(reqs, steps) if steps > 1 else None
        slots = self._alloc_decode(reqs) if step_slots is None else step_slots[0]
        batch = ScheduleBatch(
            mode=ForwardMode.DECODE, reqs=reqs, input_ids=[self._input_token(r) for r in reqs],
            positions=[r.kv_len for r in reqs], out_cache_loc=slots,
            prefix_lens=[r.kv_len for r in reqs], extend_lens=[1] * len(reqs),
            sample_rows=list(range(len(reqs))), sample_req_idx=list(range(len(reqs))),
            hidden_rows=[(i, i) for i, r in enumerate(reqs) if r.return_hidden_states], step_slots=step_slots)
        batch.sampling_info = self._decode_sampling_info(reqs)
        return batch

    def _schedule_verify(self, reqs: list[Req]) -> Optional[ScheduleBatch]:
        """A speculative verify batch of the running requests, or None (no drafts, or no room
        for them: the plain decode batch then runs)."""
        drafts = self.speculation.propose(reqs)
        if not any(drafts):
            return None
        need = sum(self.allocator.pages_needed(r.kv_len, 1 + len(d)) for r, d in zip(reqs, drafts)) * self.page_size
        if self.allocator.available() < need:
            self.cache.evict(need - self.allocator.available())
        if self.allocator.available() < need:
            return None
        slots = [self._alloc(r, 1 + len(d)) for r, d in zip(reqs, drafts)]
        self._decode_rids = ()   # the cached decode sampling info misses the tokens verify steps add
        return self.speculation.verify_batch(reqs, drafts, slots, self.vocab_size, self.runner.device,
                                             self.eos_token_ids)

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
        """The token a decode step feeds for ``req``: its last output token, or the placeholder
        of the one the batch in flight samples for it."""
        prev = self._inflight
        if prev is not None and id(req) in prev.futures:
            return prev.futures[id(req)]
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

    # -- results (OutputProcessorMixin processes them) ---------------------------------------
    def _start_running(self, req: Req) -> None:
        """A request whose prefill completed joins the decode batch (at its launch, unless
        retracted since)."""
        if not any(r is req for r in self.running):
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

    # -- control ----------------------------------------------------------------------------
    def load_info(self) -> dict:
        total = self.runner.max_total_tokens
        used = total - self.allocator.available() - self.cache.evictable_size()
        prompt = self.stats["prompt_tokens"]
        return {"num_running_reqs": len(self.running) + (1 if self.chunked_req else 0),
                "num_queue_reqs": len(self.waiting), "token_usage": used / total if total else 0.0,
                "num_used_tokens": used,
                "cache_hit_rate": self.stats["cached_tokens"] / prompt if prompt else 0.0, **self.stats,
                **(self.speculation.stats.as_dict() if self.speculation is not None else {})}

    def flush_cache(self) -> bool:
        if self.has_work():
            return False
        self.cache.reset()
        return True

