"""ScheduleBatch: the requests the scheduler chose for one step, with their KV slots allocated.

Built by the Scheduler (``_schedule_extend`` / ``_schedule_decode``), consumed by the ModelRunner,
which turns it into a ForwardBatch. Everything here is host-side lists except the slot
tensors. Shapes: T new tokens in total, B requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.scheduler.req import Req


@dataclass
class ScheduleBatch:
    mode: ForwardMode
    reqs: list[Req]
    input_ids: list[int]            # [T]
    positions: list[int]            # [T]
    out_cache_loc: torch.Tensor     # [T] int64 slots allocated for the new tokens
    prefix_lens: list[int]          # [B] KV length before the step
    extend_lens: list[int]          # [B] new tokens
    # rows of the flat token dim that need logits: (request index, row, kind) where kind is
    # "sample" (the last token of a completed prefill / every decode token) or "input" (prompt logprobs)
    sample_rows: list[int] = field(default_factory=list)      # [S] rows to sample from
    sample_req_idx: list[int] = field(default_factory=list)   # [S] index into reqs
    input_logprob_rows: list[tuple[int, int, int]] = field(default_factory=list)  # (req idx, row, target token)
    sampling_info: Any = None       # kvyard.sampling.batch_info.SamplingBatchInfo for sample rows
    # speculative verify batches (core/scheduler/speculation.py): every row of a request's draft
    # is a sample row; sample_offsets [S] is each row's depth in its draft (0 = the last token)
    sample_offsets: list[int] = field(default_factory=list)
    draft_tokens: Optional[list[Any]] = None   # [B] each request's DraftTree; None: not a verify batch
    # verify rows whose input ids are drafts still on the device (core/scheduler/speculation.py,
    # DraftFill): (int64 [M] device drafts, rows [N], index [N] into them); input_ids holds 0 there
    draft_fill: Optional[tuple] = None
    # rows whose final hidden state goes back (return_hidden_states): (request index, row), in
    # each request's position order
    hidden_rows: list[tuple[int, int]] = field(default_factory=list)
    # --enable-mixed-chunk: the last ``mixed_decodes`` requests of an extend batch are running
    # requests decoding one token each (extend_len 1 on their KV), riding with the prefill
    mixed_decodes: int = 0
    # continuous decode (core/scheduler/continuous_decode.py): [N, B] the slots of each of the N
    # decode steps this batch runs in one iteration (row 0 is out_cache_loc); None: one step
    step_slots: Optional[torch.Tensor] = None

    @property
    def num_steps(self) -> int:
        return 1 if self.step_slots is None else int(self.step_slots.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    @property
    def is_verify(self) -> bool:
        return self.draft_tokens is not None

    def is_mixed_decode(self, i: int) -> bool:
        """Whether request ``i`` decodes in this (mixed) extend batch rather than prefills."""
        return i >= len(self.reqs) - self.mixed_decodes

    def sample_offset(self, k: int) -> int:
        return self.sample_offsets[k] if self.sample_offsets else 0

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    def req_pool_indices(self) -> list[int]:
        return [r.req_pool_idx for r in self.reqs]

    def select(self, keep: list[int]) -> tuple["ScheduleBatch", list[int], list[int], list[int]]:
        """The batch of requests ``keep`` (indices into reqs, ascending), with its token rows,
        sample rows, prompt-logprob rows and hidden rows renumbered; also which sample entries,
        input_logprob_rows entries and hidden_rows entries of this batch it kept (to select a
        StepResult alike).
        sampling_info stays this batch's (its rows are the unselected sample rows); draft_fill
        stays behind (a selected batch is processed, never prepared)."""
        starts = [0]
        for n in self.extend_lens:
            starts.append(starts[-1] + n)
        new_index = {old: new for new, old in enumerate(keep)}
        new_start = {}
        tokens: list[int] = []
        for old in keep:
            new_start[old] = len(tokens)
            tokens += range(starts[old], starts[old + 1])
        shift = {old: new_start[old] - starts[old] for old in keep}
        samples = [k for k, i in enumerate(self.sample_req_idx) if i in new_index]
        inputs = [k for k, (i, _, _) in enumerate(self.input_logprob_rows) if i in new_index]
        hiddens = [k for k, (i, _) in enumerate(self.hidden_rows) if i in new_index]
        index = torch.tensor(tokens, dtype=torch.int64, device=self.out_cache_loc.device)
        batch = ScheduleBatch(
            mode=self.mode, reqs=[self.reqs[i] for i in keep],
            input_ids=[self.input_ids[t] for t in tokens], positions=[self.positions[t] for t in tokens],
            out_cache_loc=self.out_cache_loc[index], prefix_lens=[self.prefix_lens[i] for i in keep],
            extend_lens=[self.extend_lens[i] for i in keep],
            sample_rows=[self.sample_rows[k] + shift[self.sample_req_idx[k]] for k in samples],
            sample_req_idx=[new_index[self.sample_req_idx[k]] for k in samples],
            input_logprob_rows=[(new_index[i], row + shift[i], target)
                                for i, row, target in (self.input_logprob_rows[k] for k in inputs)],
            sampling_info=self.sampling_info,
            sample_offsets=[self.sample_offsets[k] for k in samples] if self.sample_offsets else [],
            draft_tokens=None if self.draft_tokens is None else [self.draft_tokens[i] for i in keep],
            hidden_rows=[(new_index[i], row + shift[i]) for i, row in (self.hidden_rows[k] for k in hiddens)],
            mixed_decodes=sum(self.is_mixed_decode(i) for i in keep))
        return batch, samples, inputs, hiddens


@dataclass
class StepResult:
    next_ids: list[int]                                 # [S] one per sample row
    logprobs: Optional[list[float]] = None              # [S]
    top_logprobs: Optional[list[list[tuple[float, int]]]] = None  # [S][K]
    input_logprobs: Optional[list[float]] = None        # one per input_logprob_rows entry
    input_top_logprobs: Optional[list[list[tuple[float, int]]]] = None
    embeddings: Optional[torch.Tensor] = None           # [B, hidden] for embedding batches
    hidden_states: Optional[list[list[float]]] = None   # [K][H] one per hidden_rows entry
    # [T, D] the target's hidden states of every token row, on the device, when a speculative
    # draft head asked for them (ModelRunner.enable_hidden_capture); read before ``select``
    captured_hidden: Optional[torch.Tensor] = None

    def select(self, samples: list[int], inputs: list[int], hiddens: list[int] = ()) -> "StepResult":
        """The entries of sample rows ``samples``, prompt-logprob rows ``inputs`` and hidden rows
        ``hiddens`` (generation steps; see ScheduleBatch.select)."""
        def pick(values, ks):
            return None if values is None else [values[k] for k in ks]
        return StepResult(next_ids=pick(self.next_ids, samples), logprobs=pick(self.logprobs, samples),
                          top_logprobs=pick(self.top_logprobs, samples),
                          input_logprobs=pick(self.input_logprobs, inputs),
                          input_top_logprobs=pick(self.input_top_logprobs, inputs),
                          hidden_states=pick(self.hidden_states, hiddens))
