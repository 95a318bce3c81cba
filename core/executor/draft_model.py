"""DraftModel: a second, smaller model that drafts token chains for speculative decoding.

It owns a ModelRunner of its own (weights, KV pool of page size 1, req_to_token rows), built
through DraftContext.make_draft_model (core/speculative.py), and keeps per request the token
ids whose KV it holds. ``propose`` brings each request's draft KV up to its current tokens (one
batched extend over what it has not seen: the tokens the target accepted since, always at least
the request's last token), samples the first draft there, then runs batched decode steps for the
rest of the chain.

Invariants, per request between calls:
  - ``state.ids`` are the tokens whose KV is in ``req_to_token[state.row, :len(state.ids)]``;
    they are a prefix of what the request had when last proposed for plus the drafts fed back
    (all but the last draft of each chain).
  - at the next ``propose`` the longest common prefix with the request's tokens is kept and the
    rest (rejected drafts) is freed first.
Each draft is sampled with the request's own sampling settings, seed and position, the same
draw the target's verify row makes, so a draft model that agrees with the target is accepted.

CUDA graphs: the chain's decode steps replay the draft runner's decode graphs; the catch-up
extend after a verify step feeds one token (a draft was rejected: the target's own token) or two
(every draft accepted: the last draft, never fed, and the bonus token), so the runner captures
extends of up to CATCH_UP_TOKENS tokens per request too. Longer catch-ups (a new request's
prompt) run eagerly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch

logger = logging.getLogger(__name__)

CATCH_UP_TOKENS = 2      # widest catch-up extend captured as a CUDA graph (module docstring)


@dataclass
class _DraftState:
    req: Req                                   # the draft's view: row, sampling params, seed
    ids: list[int] = field(default_factory=list)


class DraftModel:
    def __init__(self, runner):
        self.runner = runner
        runner.enable_extend_graphs(CATCH_UP_TOKENS)
        self.allocator = runner.allocator
        self.req_to_token = runner.req_to_token
        self.vocab_size = runner.model_config.vocab_size
        self._states: dict[str, _DraftState] = {}

    # -- public --------------------------------------------------------------------------------
    def propose(self, inputs: Sequence, depth: Sequence[int]) -> list[list[int]]:
        """inputs: DraftInputs; depth [B]: chain length wanted per request (0: none)."""
        chains: list[list[int]] = [[] for _ in inputs]
        live = []
        for i, (inp, n) in enumerate(zip(inputs, depth)):
            if n > 0 and self._sync(inp):
                live.append(i)
        if not live:
            return chains
        firsts = self._extend([inputs[i] for i in live])
        for i, tok in zip(live, firsts):
            if tok is not None:
                chains[i].append(tok)
        for step in range(1, max(depth[i] for i in live)):
            more = [i for i in live if chains[i] and len(chains[i]) == step and depth[i] > step]
            if not more:
                break
            nexts = self._decode([inputs[i] for i in more], [chains[i][-1] for i in more],
                                 [len(inputs[i].token_ids) + step for i in more])
            for i, tok in zip(more, nexts):
                if tok is not None:
                    chains[i].append(tok)
        return chains

    def release(self, rid: str) -> None:
        state = self._states.pop(rid, None)
        if state is not None:
            self._trim(state, 0)
            self.req_to_token.free(state.req.req_pool_idx)

    def close(self) -> None:
        for rid in list(self._states):
            self.release(rid)

    # -- KV bookkeeping -------------------------------------------------------------------------
    def _sync(self, inp) -> bool:
        """Keeps the longest common prefix of the draft KV and the request's tokens; False when
        the request cannot get a row."""
        state = self._states.get(inp.rid)
        if state is None:
            row = self.req_to_token.alloc()
            if row is None:
                return False
            req = Req(rid=inp.rid, origin_input_ids=[], sampling_params=inp.sampling_params,
                      sampling_seed=inp.seed, req_pool_idx=row)
            state = self._states[inp.rid] = _DraftState(req)
        tokens = inp.token_ids
        keep = 0
        limit = min(len(state.ids), len(tokens) - 1)      # the last token is always fed again
        while keep < limit and state.ids[keep] == tokens[keep]:
            keep += 1
        self._trim(state, keep)
        return True

    def _trim(self, state: _DraftState, keep: int) -> None:
        if keep < len(state.ids):
            row = self.req_to_token.table[state.req.req_pool_idx]
            self.allocator.free(row[keep:len(state.ids)].to(torch.int64))
            del state.ids[keep:]

    def _alloc(self, state: _DraftState, n: int) -> Optional[torch.Tensor]:
        kv_len = len(state.ids)
        last = int(self.req_to_token.table[state.req.req_pool_idx, kv_len - 1]) if kv_len else 0
        slots = self.allocator.alloc_for_req(kv_len, last, n)
        if slots is not None:
            self.req_to_token.write(state.req.req_pool_idx, kv_len, slots)
        return slots

    # -- forwards -------------------------------------------------------------------------------
    def _extend(self, inputs: Sequence) -> list[Optional[int]]:
        """Feeds each request's unseen tokens; the first draft of each (None: no KV room)."""
        reqs, ids, positions, slots, prefix, lens, rows, sample_pos = [], [], [], [], [], [], [], []
        for inp in inputs:
            state = self._states[inp.rid]
            new = list(inp.token_ids[len(state.ids):])
            got = self._alloc(state, len(new))
            if got is None:
                continue
            reqs.append(state.req)
            prefix.append(len(state.ids))
            positions += range(len(state.ids), len(state.ids) + len(new))
            ids += new
            lens.append(len(new))
            rows.append(len(ids) - 1)
            slots.append(got)
            state.ids += new
            sample_pos.append(len(inp.token_ids))
        if not reqs:
            return [None] * len(inputs)
        batch = self._batch(ForwardMode.EXTEND, reqs, ids, positions, slots, prefix, lens, rows)
        out = iter(self.runner.forward(batch, sample_pos).next_ids)
        done = {id(r) for r in reqs}
        return [next(out) if id(self._states[inp.rid].req) in done else None for inp in inputs]

    def _decode(self, inputs: Sequence, tokens: list[int], sample_pos: list[int]) -> list[Optional[int]]:
        reqs, slots, prefix, positions, fed, keep_pos = [], [], [], [], [], []
        for inp, tok, pos in zip(inputs, tokens, sample_pos):
            state = self._states[inp.rid]
            got = self._alloc(state, 1)
            if got is None:
                continue
            reqs.append(state.req)
            prefix.append(len(state.ids))
            positions.append(len(state.ids))
            slots.append(got)
            fed.append(tok)
            keep_pos.append(pos)
            state.ids.append(tok)
        if not reqs:
            return [None] * len(inputs)
        batch = self._batch(ForwardMode.DECODE, reqs, fed, positions, slots, prefix, [1] * len(reqs),
                            list(range(len(reqs))))
        out = iter(self.runner.forward(batch, keep_pos).next_ids)
        done = {id(r) for r in reqs}
        return [next(out) if id(self._states[inp.rid].req) in done else None for inp in inputs]

    def _batch(self, mode, reqs, ids, positions, slots, prefix, lens, rows) -> ScheduleBatch:
        batch = ScheduleBatch(mode=mode, reqs=reqs, input_ids=ids, positions=positions,
                              out_cache_loc=torch.cat(slots), prefix_lens=prefix, extend_lens=lens,
                              sample_rows=rows, sample_req_idx=list(range(len(reqs))))
        batch.sampling_info = SamplingBatchInfo.from_reqs(reqs, self.vocab_size, self.runner.device)
        return batch
