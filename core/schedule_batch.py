"""ScheduleBatch: the requests the scheduler chose for one step, with their KV slots allocated.

Built by the Scheduler (``build_extend`` / ``build_decode``), consumed by the ModelRunner,
which turns it into a ForwardBatch. Everything here is host-side lists except the slot
tensors. Shapes: T new tokens in total, B requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvyard.forward_batch import ForwardMode
from kvyard.req import Req


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

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    def req_pool_indices(self) -> list[int]:
        return [r.req_pool_idx for r in self.reqs]


@dataclass
class StepResult:
    next_ids: list[int]                                 # [S] one per sample row
    logprobs: Optional[list[float]] = None              # [S]
    top_logprobs: Optional[list[list[tuple[float, int]]]] = None  # [S][K]
    input_logprobs: Optional[list[float]] = None        # one per input_logprob_rows entry
    input_top_logprobs: Optional[list[list[tuple[float, int]]]] = None
    embeddings: Optional[torch.Tensor] = None           # [B, hidden] for embedding batches
