"""LoRABatchInfo: which adapter slot each segment of a step uses (``ForwardBatch.lora``).

A segment is one request's new tokens (contiguous in the flat token dim T); B segments per step.
    seg_indptr [B + 1] int32   token offset of each segment (decode: 0, 1, ..., B)
    seg_slots  [B] int32       slot of each segment; -1: the base model (no LoRA term)
    max_seg_len                host int, the longest segment (grid size of the Triton kernels)
    groups                     host-side, for the torch path: (slot, token rows) per slot used;
                               None in graph batches (derived from seg_slots when needed)
The device tensors are graph inputs: decode graphs capture views of preallocated buffers that
every replay refills (core/executor/cuda_graph_runner.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Rows = Union[slice, torch.Tensor]


@dataclass
class LoRABatchInfo:
    seg_indptr: torch.Tensor
    seg_slots: torch.Tensor
    max_seg_len: int
    groups: Optional[list[tuple[int, Rows]]] = None
    any_lora: bool = True            # False: every segment is the base model (nothing to add)

    def slot_groups(self) -> list[tuple[int, Rows]]:
        if self.groups is None:
            return token_groups(self.seg_slots.tolist(), self.seg_indptr.tolist())
        return self.groups


def build_batch_info(slots: list[int], seg_lens: list[int], device) -> LoRABatchInfo:
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    return LoRABatchInfo(
        seg_indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
        seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
        max_seg_len=max(seg_lens, default=0), groups=token_groups(slots, indptr),
        any_lora=any(s >= 0 for s in slots))


def token_groups(slots: list[int], indptr: list[int]) -> list[tuple[int, Rows]]:
    """(slot, rows) per slot >= 0 in first-use order; rows is a slice when contiguous."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for i, slot in enumerate(slots):
        if slot >= 0 and indptr[i + 1] > indptr[i]:
            ranges.setdefault(slot, []).append((indptr[i], indptr[i + 1]))
    out: list[tuple[int, Rows]] = []
    for slot, spans in ranges.items():
        merged = [list(spans[0])]
        for s, e in spans[1:]:
            if s == merged[-1][1]:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        if len(merged) == 1:
            out.append((slot, slice(merged[0][0], merged[0][1])))
        else:
            out.append((slot, torch.cat([torch.arange(s, e) for s, e in merged])))
    return out
