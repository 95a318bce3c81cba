"""Results of one step -> request state and ReqUpdates (the scheduler's results processing).

``OutputProcessorMixin._process`` runs on the scheduler thread after a batch's results reached
the host (at once without overlap; one step later with it). For each sampled request it appends
the token, records logprobs, checks stop conditions and the grammar; then it releases finished
requests' KV into the prefix cache, keeps an unfinished prefill chunk for the next step, and
builds the updates the API process receives (every ``stream_interval`` tokens for streams, once
at the end otherwise).

Speculative verify batches go through ``_process_verify`` (acceptance rules in
core/scheduler/speculation.py). The mixin reads the scheduler's state (config, stats, cache,
stop_checker, grammar, speculation) and calls its ``_release`` / ``_start_running`` /
``_give_back_kv`` / ``_drain_pending``; it owns no state of its own.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvyard.scheduler.io_struct import ReqUpdate
from kvyard.scheduler.req import FinishReason, Req
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult


class OutputProcessorMixin:
    def _process(self, batch: ScheduleBatch, result: StepResult) -> list[ReqUpdate]:
        updates = self._drain_pending()
        if result.embeddings is not None:
            return updates + self._finish_embeddings(batch, result)
        self._collect_input_logprobs(batch, result)
        for (i, _), row in zip(batch.hidden_rows, result.hidden_states or ()):
            batch.reqs[i].add_hidden_state(row)
        sampled = set()
        for k, (i, token) in enumerate(zip(batch.sample_req_idx, result.next_ids)):
            req = batch.reqs[i]
            sampled.add(i)
            if req.sampling_params.max_new_tokens == 0:
                req.finished_reason = FinishReason("length")
                continue
            self._append_token(req, token, result, k)
        for i, req in enumerate(batch.reqs):
            if i not in sampled:  # a chunk of a longer prefill: keep going next step
                self.cache.cache_unfinished_req(req)
                self.chunked_req = req
                continue
            prefilled = batch.mode.is_extend() and not batch.is_mixed_decode(i)
            if prefilled:
                self.stats["prompt_tokens"] += len(req.origin_input_ids) if req.retractions == 0 else 0
                self.stats["cached_tokens"] += req.cached_tokens if req.retractions == 0 else 0
            if req.finished():
                self._release(req, insert=True)
            elif prefilled:
                self._start_running(req)
            update = self._maybe_update(req)
            if update:
                updates.append(update)
        return updates

    def _append_token(self, req: Req, token: int, result: StepResult, k: int) -> None:
        """One sampled token (sample row k of ``result``) joins the request's output; its stop
        conditions and grammar are checked."""
        req.output_ids.append(token)
        self.stats["generation_tokens"] += 1
        if req.return_logprob and result.logprobs is not None:
            req.output_token_logprobs.append((result.logprobs[k], token))
            if result.top_logprobs is not None:
                req.output_top_logprobs.append(result.top_logprobs[k])
        req.finished_reason = self.stop_checker.check(req, self.config.context_length)
        if req.grammar is not None:
            req.finished_reason = self.grammar.after_token(req, token, req.finished_reason)

    def _process_verify(self, batch: ScheduleBatch, result: StepResult) -> list[ReqUpdate]:
        """A speculative verify batch (core/scheduler/speculation.py): each request gains the
        target's tokens along its accepted path, the KV of that path moves to the rows right after
        its prefix, and the KV of the other rows is given back."""
        updates = self._drain_pending()
        row, kept, moves = 0, [], []
        for req, tree in zip(batch.reqs, batch.draft_tokens):
            n = 1 + len(tree)
            targets = result.next_ids[row:row + n]
            path = tree.accept(targets)
            gained = []
            for r in path:
                self._append_token(req, targets[r], result, row + r)
                gained.append(targets[r])
                if req.finished():
                    break
            kept.append(len(gained))       # the root and the gained tokens but the newest
            moves += self._path_moves(batch.out_cache_loc, row, path[:len(gained)])
            row += n
            accepted = min(len(path) - 1, len(gained))
            req.spec_verify_ct += 1
            req.spec_accepted_tokens += accepted
            self.speculation.record(req.rid, tree, accepted, gained)
        self._move_kv(moves)
        end = 0
        for req, tree, k in zip(batch.reqs, batch.draft_tokens, kept):
            end += 1 + len(tree)     # the verify's own host slots: no read of the device table
            self._give_back_kv(req, 1 + len(tree) - k, slots=batch.out_cache_loc, end=end)
            if req.finished():
                self._release(req, insert=True)
            update = self._maybe_update(req)
            if update:
                updates.append(update)
        self.speculation.stats.verify_steps += 1
        return updates

    @staticmethod
    def _path_moves(slots: torch.Tensor, start: int, path: list[int]) -> list[tuple[int, int]]:
        """(source slot, target slot) pairs that put the KV of verify row path[j] where row j's
        is; slots: int64 host, the batch's out_cache_loc, whose row ``start`` is the request's
        first verify row; none for a chain's path."""
        moves = [(start + r, start + j) for j, r in enumerate(path) if r != j]
        if not moves:
            return []
        return [(int(slots[a]), int(slots[b])) for a, b in moves]

    def _move_kv(self, moves: list[tuple[int, int]]) -> None:
        """Copies the KV of every (source, target) slot pair, all layers, in one call."""
        if moves:
            src, dst = zip(*moves)
            self.runner.kv_pool.copy_slots(torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64))

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
        """The request's news since its last update (tokens, logprobs; prompt logprobs once)."""
        start = req.sent_len
        update = ReqUpdate(
            rid=req.rid, new_token_ids=req.output_ids[start:],
            finished_reason=req.finished_reason.to_dict() if req.finished_reason else None,
            prompt_tokens=len(req.origin_input_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            output_token_logprobs=req.output_token_logprobs[start:],
            output_top_logprobs=req.output_top_logprobs[start:],
            spec_verify_ct=req.spec_verify_ct, spec_accepted_tokens=req.spec_accepted_tokens,
            hidden_states=req.hidden_states[req.hidden_sent:])
        req.hidden_sent = len(req.hidden_states)
        if req.return_logprob and not req.input_logprobs_sent and (req.finished() or start == 0 and req.output_ids):
            update.input_token_logprobs = _with_first_none(req)
            update.input_top_logprobs = req.input_top_logprobs
            req.input_logprobs_sent = True
        req.sent_len = len(req.output_ids)
        return update


def _with_first_none(req: Req) -> list:
    """Prompt logprobs as SGLang returns them: the first prompt token has no logprob."""
    out = list(req.input_token_logprobs)
    if req.logprob_start_len == 0 and req.origin_input_ids:
        out.insert(0, (None, req.origin_input_ids[0]))
    return out
