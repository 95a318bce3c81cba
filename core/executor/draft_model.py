"""DraftModel: a second, smaller model that drafts token chains for speculative decoding.

It owns a ModelRunner of its own (weights, KV pool of page size 1, req_to_token rows), built
through DraftContext.make_draft_model (core/speculative.py), and keeps per request the token
ids whose KV it holds. ``propose`` runs one cycle: it allocates
each request's KV for the whole cycle at once (its unseen tokens: the tokens the target accepted
since, always at least the request's last token; and the depth - 1 drafts it feeds back), brings
the draft KV up to the request's tokens in one batched extend that samples the first draft, then
runs batched decode steps for the rest of the chain. The drafts stay on the device between steps
(each step's sampled ids are the next step's input ids; positions, slots and seed positions of
every step are built once per cycle) and after it: ``propose`` returns DeviceChains
(core/speculative.py) whose tokens the verify batch takes on the device, and whose host copy,
started when the chain ends, is read after the verify step's sync. Nothing here waits for the
device.

Invariants, per request between calls:
  - ``state.ids`` plus the drafts of ``state.fed`` (the last cycle's, settled onto ``ids`` when
    next needed) are the tokens whose KV is in ``req_to_token[state.row, :kv_len]``; they are a
    prefix of what the request had when last proposed for plus the drafts fed back (all but
    the last draft of each chain).
  - ``state.tail`` holds the host slots of the positions allocated last (one cycle's), so
    trimming rejected drafts reads nothing back from the device table.
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
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from kvyard.executor.host_pack import to_device
from kvyard.forward_batch import ForwardBatch, ForwardMode
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch
from kvyard.speculative import DeviceDrafts

logger = logging.getLogger(__name__)

CATCH_UP_TOKENS = 2      # widest catch-up extend captured as a CUDA graph (module docstring)


@dataclass
class _DraftState:
    req: Req                                   # the draft's view: row, sampling params, seed
    ids: list[int] = field(default_factory=list)
    # host int64 copy of the slots last allocated: positions tail_start .. tail_start + len - 1
    # (one cycle's); trimming within them frees from here, not from the device table
    tail_start: int = 0
    tail: Optional[torch.Tensor] = None
    # the last cycle's drafts fed back, (DeviceDrafts, row, count): their KV is written, their
    # ids join ``ids`` when next needed (by then on the host without a wait)
    fed: Optional[tuple] = None


def _settle(state: _DraftState) -> None:
    """Appends the drafts fed back in the last cycle to ``state.ids``."""
    if state.fed is not None:
        drafts, row, n = state.fed
        state.ids += drafts.host()[row][:n]
        state.fed = None


class DraftModel:
    def __init__(self, runner):
        self.runner = runner
        # a cycle writes its chain's slots into the row right after the catch-up tokens before the
        # catch-up extend runs, so the extend's padded rows must not point those entries at the
        # dummy slot (every entry of the zero-initialized table is a slot of this pool anyway)
        runner.enable_extend_graphs(CATCH_UP_TOKENS, pad_table_entries=False)
        self.allocator = runner.allocator
        self.req_to_token = runner.req_to_token
        self.vocab_size = runner.model_config.vocab_size
        self._states: dict[str, _DraftState] = {}
        self._info_key: tuple = ()                  # _sampling_info's cache
        self._info: Optional[SamplingBatchInfo] = None
        self._info_reqs: list[Req] = []

    # -- public --------------------------------------------------------------------------------
    def propose(self, inputs: Sequence, depth: Sequence[int]) -> list:
        """inputs: DraftInputs; depth [B]: chain length wanted per request (0: none). Per request
        a chain: [] or a DeviceChain whose tokens are still on the device (nothing here waits
        for the draft steps: the verify batch is built around them)."""
        chains: list = [[] for _ in inputs]
        live = [i for i, (inp, n) in enumerate(zip(inputs, depth)) if n > 0 and self._sync(inp)]
        cycle = self._plan(live, inputs, depth)
        if cycle is None:
            return chains
        try:
            drafts = DeviceDrafts(self._run(cycle))      # [L, max depth], its host copy under way
        except Exception:
            self._abandon(cycle)
            raise
        for k, i in enumerate(cycle.index):
            chains[i] = drafts.chain(k, cycle.depth[k])
            # fed back to the draft (their KV is written): joins state.ids once on the host
            cycle.states[k].fed = (drafts, k, cycle.depth[k] - 1)
        return chains

    def release(self, rid: str) -> None:
        state = self._states.pop(rid, None)
        if state is not None:
            _settle(state)
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
        _settle(state)
        tokens = inp.token_ids
        limit = min(len(state.ids), len(tokens) - 1)      # the last token is always fed again
        keep = limit if list(tokens[:limit]) == state.ids[:limit] else 0   # the usual case, at C speed
        while keep < limit and state.ids[keep] == tokens[keep]:
            keep += 1
        self._trim(state, keep)
        return True

    def _trim(self, state: _DraftState, keep: int) -> None:
        """Frees the draft KV of positions keep.. (rejected drafts; all of it on release)."""
        end = len(state.ids)
        if keep >= end:
            return
        tail = state.tail
        if tail is not None and state.tail_start <= keep and end <= state.tail_start + tail.numel():
            freed = tail[keep - state.tail_start:end - state.tail_start]     # the usual case: no device read
        else:
            freed = self.req_to_token.table[state.req.req_pool_idx, keep:end].to(torch.int64)
        self.allocator.free(freed)
        del state.ids[keep:]

    def _alloc(self, state: _DraftState, n: int) -> Optional[torch.Tensor]:
        """int64 [n] slots for the next n positions of the request, written to its row."""
        kv_len = len(state.ids)
        last = 0
        if kv_len and self.allocator.page_size > 1:   # the slot before is read only to fill its page
            last = int(self.req_to_token.table[state.req.req_pool_idx, kv_len - 1])
        slots = self.allocator.alloc_for_req(kv_len, last, n)
        if slots is not None:
            self.req_to_token.write(state.req.req_pool_idx, kv_len, slots)
            state.tail_start, state.tail = kv_len, slots
        return slots

    # -- one cycle: the catch-up extend, then the chain's decode steps on the device -----------
    def _plan(self, live: list[int], inputs: Sequence, depth: Sequence[int]) -> Optional["_Cycle"]:
        """Allocates the KV of the whole cycle per request at once (its unseen tokens and the
        depth - 1 drafts it feeds back); a request without room gets no draft. None: none left."""
        cycle = _Cycle()
        for i in live:
            state, n = self._states[inputs[i].rid], depth[i]
            new = list(inputs[i].token_ids[len(state.ids):])
            slots = self._alloc(state, len(new) + n - 1)
            if slots is None:
                continue
            cycle.add(i, state, new, slots, n, len(inputs[i].token_ids))
            state.ids += new
        return cycle.finish() if cycle.reqs else None

    def _abandon(self, cycle: "_Cycle") -> None:
        """A failed cycle: its chain slots go back and each request's draft KV back to what it
        held before the cycle (the extend may not have written its tokens)."""
        for k, state in enumerate(cycle.states):
            if cycle.depth[k] > 1:
                self.allocator.free(cycle.chain_slots[:cycle.depth[k] - 1, k])
            self._trim(state, cycle.prefix[k])

    def _run(self, cycle: "_Cycle") -> torch.Tensor:
        """int64 [L, max depth] the drafts, left on the device: the catch-up extend samples column
        0; decode step j feeds column j - 1 back as its input ids. The first step's ForwardBatch
        is the extend's with decode rows (device tensors, nothing copied from the host); step j
        reuses it with row j of tables built once per cycle (positions, seq lens, slots, sample
        positions), so a step makes no host list into a tensor and reads nothing back; only when
        a shorter chain ends is a ForwardBatch prepared again, for the requests left."""
        runner, L, D = self.runner, len(cycle.reqs), max(cycle.depth)
        long = dict(dtype=torch.int64, device=runner.device)
        info = self._sampling_info(cycle.reqs)
        steps = torch.arange(D, **long)                                   # [D]
        # step-major [D, L] tables: a step's row is a contiguous view (kernels take contiguous slots)
        first_pos, chain_slots = to_device([cycle.sample_pos], cycle.chain_slots.flatten(), runner.device)
        sample_pos = steps[:, None] + first_pos                    # [D, L] seed position per draft
        chain_slots = chain_slots.view(D - 1, L)                   # [D - 1, L], once per cycle
        extend_fb = runner.prepare(cycle.extend_batch())
        cols = [runner.sample_on_device(extend_fb, info, sample_pos[0])]
        rows: list[Optional[torch.Tensor]] = [None]   # per step: the cycle rows it ran (None: all)
        members = None
        for step in range(1, D):
            now = [k for k in range(L) if cycle.depth[k] > step]
            if now != members:           # the first step, or a chain ended: new tensors
                members, first = now, step
                index = None if len(now) == L else torch.tensor(now, **long)
                pick = (lambda t: t) if index is None else (lambda t: t[:, index])
                step_info = info if index is None else self._sampling_info([cycle.reqs[k] for k in now])
                slots, seeds = pick(chain_slots)[step - 1:], pick(sample_pos)[step:]   # [D - step, B]
                prev = cols[-1] if rows[-1] is None and index is None else _gather(cols, rows, now, L)
                if step == 1 and index is None:   # every request: from the extend's device tensors
                    fb = _decode_after(extend_fb, prev, cycle.decode_lens(now, 0), slots[0])
                else:
                    fb = runner.prepare(cycle.decode_batch(now, slots[0], step - 1))
                ahead = steps[:D - step, None]                                                  # [D - step, 1]
                positions, seq_lens = ahead + fb.positions, ahead + fb.seq_lens
                host_lens = fb.seq_lens_cpu
            shift = step - first
            if shift:                    # the same ForwardBatch, one position further
                fb.positions, fb.seq_lens, fb.out_cache_loc = positions[shift], seq_lens[shift], slots[shift]
                fb.seq_lens_cpu = [n + shift for n in host_lens]
                fb.extend_prefix_lens_cpu = [n - 1 for n in fb.seq_lens_cpu]
                fb.attn_metadata, fb.captured = None, {}
            fb.input_ids = prev
            prev = runner.sample_on_device(fb, step_info, seeds[shift])
            cols.append(prev)
            rows.append(index)
        return _stack(cols, rows, L)

    def _sampling_info(self, reqs: list[Req]) -> SamplingBatchInfo:
        """The draft batch's sampling tensors, kept while the same requests draft (batch 1 every
        cycle): a draft Req's settings never change and drafted requests have no penalty state."""
        key = tuple(id(r) for r in reqs)      # _info_reqs holds them: no id is reused meanwhile
        if self._info_key != key:
            self._info = SamplingBatchInfo.from_reqs(reqs, self.vocab_size, self.runner.device)
            self._info_key, self._info_reqs = key, list(reqs)
        return self._info


def _decode_after(extend_fb: ForwardBatch, input_ids: torch.Tensor, kv: list[int],
                  slots: torch.Tensor) -> ForwardBatch:
    """The first chain step's decode ForwardBatch of every request of the catch-up extend
    ``extend_fb``, built from its device tensors (no host list copied to the device): each
    request's position is the extend's sequence length (kv [B], the same on the host); input_ids
    [B] the drafts the extend sampled; slots [B] the step's KV slots."""
    rows = torch.arange(extend_fb.batch_size, dtype=torch.int64, device=extend_fb.positions.device)
    return replace(extend_fb, mode=ForwardMode.DECODE, input_ids=input_ids, positions=extend_fb.seq_lens,
                   out_cache_loc=slots, seq_lens=extend_fb.seq_lens + 1, seq_lens_cpu=[n + 1 for n in kv],
                   extend_prefix_lens_cpu=list(kv), extend_seq_lens_cpu=[1] * len(kv), extend_start_loc=rows,
                   logits_indices=rows, attn_metadata=None, captured={}, spec_tree=None, spec_verify=False,
                   hidden_indices=None, extras={})


def _gather(cols: list, rows: list, members: list[int], n: int) -> torch.Tensor:
    """[len(members)] the last column's tokens of cycle rows ``members`` (each ran that step)."""
    return _stack(cols[-1:], rows[-1:], n)[members, 0]


def _stack(cols: list, rows: list, n: int) -> torch.Tensor:
    """int64 [n, len(cols)] column j = cols[j] at cycle rows rows[j] (None: all n), 0 elsewhere."""
    if all(r is None for r in rows):
        return torch.stack(cols, dim=1)
    out = torch.zeros((n, len(cols)), dtype=torch.int64, device=cols[0].device)
    for j, (col, r) in enumerate(zip(cols, rows)):
        if r is None:
            out[:, j] = col
        else:
            out[r, j] = col
    return out


@dataclass
class _Cycle:
    """One propose call's requests (L of them, in the caller's order) and their host lists: the
    catch-up extend's, and ``chain_slots`` int64 [max depth - 1, L] the slots of each chain
    step (a shorter chain's column padded with slot 0, never written: a request leaves the decode
    steps once its chain is complete)."""
    index: list[int] = field(default_factory=list)          # [L] the caller's index of each
    states: list = field(default_factory=list)               # [L] _DraftState
    reqs: list = field(default_factory=list)                 # [L] their draft Reqs
    depth: list[int] = field(default_factory=list)           # [L] chain length wanted
    ids: list[int] = field(default_factory=list)             # [T] the extend's new tokens
    positions: list[int] = field(default_factory=list)       # [T]
    prefix: list[int] = field(default_factory=list)          # [L] draft KV before the extend
    lens: list[int] = field(default_factory=list)            # [L] new tokens each
    rows: list[int] = field(default_factory=list)            # [L] the extend's sample row of each
    extend_slots: list = field(default_factory=list)         # [L] int64 [lens[k]]
    chain_slots: object = field(default_factory=list)        # [L] int64 [depth - 1]; finish: [D - 1, L]
    sample_pos: list[int] = field(default_factory=list)      # [L] seq length at the first draft

    def add(self, index: int, state: _DraftState, new: list[int], slots: torch.Tensor, depth: int,
            seq_len: int) -> None:
        kv = len(state.ids)
        self.index.append(index)
        self.states.append(state)
        self.reqs.append(state.req)
        self.depth.append(depth)
        self.prefix.append(kv)
        self.positions += range(kv, kv + len(new))
        self.ids += new
        self.lens.append(len(new))
        self.rows.append(len(self.ids) - 1)
        self.extend_slots.append(slots[:len(new)])
        self.chain_slots.append(slots[len(new):])
        self.sample_pos.append(seq_len)

    def finish(self) -> "_Cycle":
        width = max(self.depth) - 1
        self.chain_slots = torch.stack([torch.nn.functional.pad(s, (0, width - s.numel()))
                                        for s in self.chain_slots], dim=1).contiguous()   # [D - 1, L]
        return self

    def extend_batch(self) -> ScheduleBatch:
        return ScheduleBatch(mode=ForwardMode.EXTEND, reqs=self.reqs, input_ids=self.ids,
                             positions=self.positions, out_cache_loc=torch.cat(self.extend_slots),
                             prefix_lens=self.prefix, extend_lens=self.lens, sample_rows=self.rows,
                             sample_req_idx=list(range(len(self.reqs))))

    def decode_lens(self, members: list[int], fed: int) -> list[int]:
        """[len(members)] the draft KV length before the chain step that feeds draft ``fed``."""
        return [self.prefix[k] + self.lens[k] + fed for k in members]

    def decode_batch(self, members: list[int], slots: torch.Tensor, fed: int) -> ScheduleBatch:
        """The chain step of requests ``members`` that feeds their draft ``fed`` (0: the first;
        input ids are placeholders: the caller sets the device tensor of drafts)."""
        reqs = [self.reqs[k] for k in members]
        kv = self.decode_lens(members, fed)
        return ScheduleBatch(mode=ForwardMode.DECODE, reqs=reqs, input_ids=[0] * len(reqs), positions=kv,
                             out_cache_loc=slots, prefix_lens=kv, extend_lens=[1] * len(reqs),
                             sample_rows=list(range(len(reqs))), sample_req_idx=list(range(len(reqs))))
