"""Speculative decoding inside the scheduler: drafts -> one verify batch -> accepted tokens.

A verify batch is an extend over each request's KV: row 0 feeds the request's last token (the
root), rows 1..n its n draft nodes (a DraftTree, core/speculative.py; a chain is a tree of one
branch). Node i sits at position ``kv_len + depth(i)`` and attends the prefix and its ancestors
only: a chain needs the causal mask alone (every attention plugin serves it), a branching tree
puts its mask on the ForwardBatch (``spec_tree``). Every row is a sample row with the request's
own sampling settings at position ``seq_len + depth``: the target's token there is what a plain
decode step would sample after that node's path (core/speculative.py states why this is exact).

Acceptance of a request with target tokens t_r per row: the path [0, r_1, .., r_m] that
``DraftTree.accept`` walks; the request gains t_0, t_{r_1}, .., t_{r_m} (fewer if a stop
condition ends it earlier). Its KV then holds the last token and the gained tokens but the
newest (kv_len = L + gained): the KV of path rows r_1.. is copied to the slots of rows 1.. (the
request's req_to_token row stays contiguous, whatever the page size; a chain copies nothing) and
the slots of the remaining rows are given back before anything else happens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.scheduler.inflight import needs_host_state
from kvyard.scheduler.req import Req
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult
from kvyard.speculative import DraftInput, DraftTree, HiddenStep, SpeculativeAlgorithm, SpeculativeConfig, as_tree


@dataclass
class SpecStats:
    verify_steps: int = 0          # verify forwards run
    drafted: int = 0               # draft tokens proposed
    accepted: int = 0              # draft tokens accepted

    def as_dict(self) -> dict:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        mean_len = (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0
        return {"spec_verify_steps": self.verify_steps, "spec_draft_tokens": self.drafted,
                "spec_accepted_tokens": self.accepted, "spec_accept_rate": rate,
                "spec_accept_length": mean_len}


class Speculation:
    def __init__(self, algorithm: SpeculativeAlgorithm, config: SpeculativeConfig, context_length: int):
        self.algorithm = algorithm
        self.config = config
        self.context_length = context_length
        self.stats = SpecStats()
        self._verify_key: tuple = ()            # _verify_sampling_info's cache
        self._verify_reqs: list[Req] = []
        self._verify_info: Optional[SamplingBatchInfo] = None

    # -- proposing ------------------------------------------------------------------------------
    def draft_room(self, req: Req) -> tuple[int, int]:
        """(nodes, depth) ``req`` may draft now: (0, 0) for requests decoded plainly."""
        if needs_host_state(req) or req.embed:
            return 0, 0
        p = req.sampling_params
        left = p.max_new_tokens - len(req.output_ids) - 1        # the bonus token needs room too
        room = self.context_length - req.seq_len - 1
        if not self.config.tree:
            depth = max(0, min(self.config.max_draft_len, left, room))
            return depth, depth
        nodes = max(0, min(self.config.max_draft_len, room))
        return nodes, max(0, min(nodes, left, self.config.num_steps))

    def propose(self, reqs: Sequence[Req]) -> list[DraftTree]:
        rooms = [self.draft_room(r) for r in reqs]
        asked = [(i, r) for i, r in enumerate(reqs) if rooms[i][1] > 0]
        drafts = [DraftTree((), ()) for _ in reqs]
        if not asked:
            return drafts
        inputs = [DraftInput(rid=r.rid, token_ids=r.all_ids, max_draft_len=rooms[i][0], seed=r.sampling_seed,
                             sampling_params=r.sampling_params, kv_row=r.req_pool_idx, max_depth=rooms[i][1])
                  for i, r in asked]
        for (i, _), draft in zip(asked, self.algorithm.propose(inputs)):
            tree = as_tree(draft)
            if not self.config.tree and not tree.is_chain:   # attention may not serve the tree mask
                tree = tree.first_branch()
            drafts[i] = tree.pruned(*rooms[i])
        return drafts

    # -- the verify batch -----------------------------------------------------------------------
    def verify_batch(self, reqs: list[Req], drafts: list[DraftTree], slots: list[torch.Tensor],
                     vocab_size: int, device, eos_token_ids: list[int]) -> ScheduleBatch:
        """reqs [B] with their draft trees and their allocated slots [1 + len(drafts[i])] each."""
        input_ids, positions, rows, row_req, offsets = [], [], [], [], []
        fill = DraftFill()
        for i, (req, tree) in enumerate(zip(reqs, drafts)):
            start = len(input_ids)
            depths = [0, *tree.depths()]
            input_ids += [req.output_ids[-1], *fill.take(tree, start + 1)]
            positions += [req.kv_len + d for d in depths]
            rows += range(start, start + 1 + len(tree))
            row_req += [i] * (1 + len(tree))
            offsets += depths
        batch = ScheduleBatch(
            mode=ForwardMode.EXTEND, reqs=reqs, input_ids=input_ids, positions=positions,
            out_cache_loc=torch.cat(slots), prefix_lens=[r.kv_len for r in reqs],
            extend_lens=[1 + len(d) for d in drafts], sample_rows=rows, sample_req_idx=row_req,
            sample_offsets=offsets, draft_tokens=drafts, draft_fill=fill.done())
        batch.sampling_info = self._verify_sampling_info(reqs, row_req, vocab_size, device, eos_token_ids)
        return batch

    def _verify_sampling_info(self, reqs: list[Req], row_req: list[int], vocab_size: int, device,
                              eos_token_ids: list[int]) -> SamplingBatchInfo:
        """The verify batch's sampling tensors (one row per verify row), kept while the same
        requests verify the same number of rows each (batch 1 at full drafts: every cycle). Only
        without host sampling state (penalties, grammar, ...): then the tensors depend on each
        request's settings and seed alone, which never change."""
        key = tuple(id(reqs[i]) for i in row_req)       # _verify_reqs holds them: no id is reused
        if key != self._verify_key or any(needs_host_state(r) for r in reqs):
            info = SamplingBatchInfo.from_reqs([reqs[i] for i in row_req], vocab_size, device,
                                               eos_token_ids=eos_token_ids)
            if any(needs_host_state(r) for r in reqs):
                return info
            self._verify_key, self._verify_reqs, self._verify_info = key, list(reqs), info
        return self._verify_info

    # -- the target's hidden states (draft heads) ----------------------------------------------
    def observe(self, batch: ScheduleBatch, result: StepResult, owned: Sequence[int]) -> None:
        """Hands the algorithm the hidden states of a finished target step, before its tokens join
        the requests: for each owned request, the rows whose KV it keeps and the token after each
        (the next prompt token, the sampled token, or in a verify batch the accepted drafts and
        the target's own token)."""
        hidden = result.captured_hidden
        if hidden is None:
            return
        starts = [0]
        for n in batch.extend_lens:
            starts.append(starts[-1] + n)
        sampled = {i: k for k, i in enumerate(batch.sample_req_idx) if batch.sample_offset(k) == 0}
        steps = []
        for i in owned:
            req, start, n = batch.reqs[i], starts[i], batch.extend_lens[i]
            path = None
            if batch.is_verify:
                targets = result.next_ids[sampled[i]:sampled[i] + n]
                path = batch.draft_tokens[i].accept(targets)
                nxt = [targets[r] for r in path]
            else:
                ids = req.all_ids
                first = batch.prefix_lens[i] + 1
                nxt = list(ids[first:first + n])
                if len(nxt) < n:
                    if i not in sampled:
                        continue
                    nxt.append(result.next_ids[sampled[i]])
            # the rows whose KV the request keeps; their slots after the verify's KV compaction
            # are the first len(nxt) of the request's (output_processor moves the path there)
            rows = torch.tensor([start + r for r in path] if path is not None else range(start, start + len(nxt)),
                                dtype=torch.int64, device=hidden.device)
            steps.append(HiddenStep(rid=req.rid, kv_row=req.req_pool_idx, start=batch.prefix_lens[i],
                                    next_tokens=nxt, slots=batch.out_cache_loc[start:start + len(nxt)],
                                    hidden=hidden[rows]))
        self.algorithm.observe(steps)

    # -- accepting --------------------------------------------------------------------------------
    def record(self, rid: str, tree: DraftTree, accepted: int, gained: Sequence[int]) -> None:
        self.stats.drafted += len(tree)
        self.stats.accepted += accepted
        self.algorithm.accepted(rid, gained)

    def release(self, rid: str) -> None:
        self.algorithm.release(rid)

    def close(self) -> None:
        self.algorithm.close()


class DraftFill:
    """The verify batch's input ids that are drafts still on the device (DeviceChains of one
    DeviceDrafts): ``ModelRunner.prepare`` writes them into its device input ids, so the batch is
    built and launched without waiting for the draft steps. Chains of another DeviceDrafts (a
    second source in one batch: not produced by the built-in algorithms) come to the host."""

    def __init__(self):
        self.source = None                 # the DeviceDrafts
        self.rows: list[int] = []          # [N] verify rows (flat token index) of device drafts
        self.index: list[int] = []         # [N] their flat index into source.tensor

    def take(self, tree: DraftTree, first_row: int) -> Sequence[int]:
        """The input ids of ``tree``'s nodes, whose first verify row is ``first_row``: its tokens,
        or placeholders (0) for device drafts recorded here."""
        src = tree.device_tokens()
        if src is None or (self.source is not None and src[0] is not self.source):
            return tree.tokens
        self.source, (_, row) = src[0], src
        width = self.source.tensor.shape[1]
        self.rows += range(first_row, first_row + len(tree))
        self.index += range(row * width, row * width + len(tree))
        return [0] * len(tree)

    def done(self) -> Optional[tuple]:
        """(int64 [L * D] device drafts, rows, index) for ScheduleBatch.draft_fill, or None."""
        return None if not self.rows else (self.source.tensor.reshape(-1), self.rows, self.index)


def make_speculation(config: Optional[SpeculativeConfig], context) -> Optional[Speculation]:
    """The Speculation for ``config`` (None: speculative decoding off); context: a DraftContext."""
    if config is None:
        return None
    from kvyard.plugins import registry

    algorithm = registry("speculative_algorithms").get(config.algorithm)(config, context)
    return Speculation(algorithm, config, context.context_length)
