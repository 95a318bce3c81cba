"""The batched LoRA matmuls: shrink (x @ A.T) then expand (@ B.T) per segment's slot.

x [T, in], y [T, out] (the base output, updated in place and returned), A [S, n R, in],
B [S, out, R], shard_sizes: the n output widths of a fused layer. Two implementations with one
result: ``lora_torch`` (the CPU path: one pair of matmuls per slot used, over its token rows)
and the Triton kernel pair (core/kernels/triton_ops/lora.py, CUDA; a split-K shrink and an
expand that reduces its partial sums; segment/slot-gather GEMMs whose
indices are device tensors, so decode graphs capture them).
"""
from __future__ import annotations

import torch

from kvyard.lora.batch import LoRABatchInfo


def lora_torch(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               shard_sizes: list[int], info: LoRABatchInfo) -> torch.Tensor:
    r = a.shape[1] // len(shard_sizes)
    for slot, rows in info.slot_groups():
        xa = x[rows] @ a[slot].t()                           # [t, n R]
        if len(shard_sizes) == 1:
            delta = xa @ b[slot].t()                         # [t, out]
        else:
            parts, start = [], 0
            for k, size in enumerate(shard_sizes):
                parts.append(xa[:, k * r:(k + 1) * r] @ b[slot, start:start + size].t())
                start += size
            delta = torch.cat(parts, dim=1)
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows.to(y.device), delta)
    return y


def lora_triton(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                shard_sizes: list[int], info: LoRABatchInfo) -> torch.Tensor:
    from kvyard.kernels.triton_ops.lora import lora_expand, lora_shrink

    part = lora_shrink(x, a, info.seg_indptr, info.seg_slots, info.max_seg_len)   # [SPLIT_K, T, n R] f32
    lora_expand(part, b, y, shard_sizes, info.seg_indptr, info.seg_slots, info.max_seg_len)
    return y


BACKENDS = {"torch": lora_torch, "triton": lora_triton}
