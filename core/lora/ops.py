"""The batched LoRA matmuls: shrink (x @ A.T) then expand (@ B.T) per segment's slot.

x [T, in], y [T, out] (the base output, updated in place and returned), A [S, n R, in],
B [S, out, R], shard_sizes: the n output widths of a fused layer. Two implementations with one
result, each in two forms:
  apply(x, y, A, B, ...)   shrink and expand after the base matmul (any quantized base)
  expand(h, y, B, ...)     the fused form: the base GEMM already produced h [T, S n R] = x @ A_all.T
                           (A rows appended to an unquantized weight, kvyard.lora.hook), so only
                           the expand runs: slot s's columns of h are [s n R, (s + 1) n R)
``torch`` (the CPU path: one pair of matmuls per slot used, over its token rows) and ``triton``
(core/kernels/triton_ops/lora.py, CUDA: a split-K shrink and an expand that reduces its partial
sums; the fused form one expand launch; segment/slot-gather kernels whose indices are device
tensors, so decode graphs capture them). ``fuses``: whether serving uses the fused form where
the base weight allows it (triton: yes; torch: no, S n R extra rows cost the CPU more than the
shrink they replace — the fused torch form stays as the reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvyard.lora.batch import LoRABatchInfo


def _delta(xa: torch.Tensor, b: torch.Tensor, shard_sizes: list[int]) -> torch.Tensor:
    """xa [t, n R] (shard k in columns [kR, (k+1)R)), b [out, R] one slot's B -> [t, out]."""
    if len(shard_sizes) == 1:
        return xa @ b.t()
    r = xa.shape[1] // len(shard_sizes)
    parts, start = [], 0
    for k, size in enumerate(shard_sizes):
        parts.append(xa[:, k * r:(k + 1) * r] @ b[start:start + size].t())
        start += size
    return torch.cat(parts, dim=1)


def _add_rows(y: torch.Tensor, rows, delta: torch.Tensor) -> None:
    if isinstance(rows, slice):
        y[rows] += delta
    else:
        y.index_add_(0, rows.to(y.device), delta)


def lora_torch(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               shard_sizes: list[int], info: LoRABatchInfo) -> torch.Tensor:
    for slot, rows in info.slot_groups():
        _add_rows(y, rows, _delta(x[rows] @ a[slot].t(), b[slot], shard_sizes))   # xa [t, n R]
    return y


def expand_torch(h: torch.Tensor, y: torch.Tensor, b: torch.Tensor, shard_sizes: list[int],
                 info: LoRABatchInfo) -> torch.Tensor:
    cols = len(shard_sizes) * b.shape[2]
    for slot, rows in info.slot_groups():
        _add_rows(y, rows, _delta(h[rows, slot * cols:(slot + 1) * cols], b[slot], shard_sizes))
    return y


def lora_triton(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                shard_sizes: list[int], info: LoRABatchInfo) -> torch.Tensor:
    from kvyard.kernels.triton_ops.lora import lora_expand, lora_shrink

    part = lora_shrink(x, a, info.seg_indptr, info.seg_slots, info.max_seg_len)   # [SPLIT_K, T, n R] f32
    lora_expand(part, b, y, shard_sizes, info.seg_indptr, info.seg_slots, info.max_seg_len)
    return y


def expand_triton(h: torch.Tensor, y: torch.Tensor, b: torch.Tensor, shard_sizes: list[int],
                  info: LoRABatchInfo) -> torch.Tensor:
    from kvyard.kernels.triton_ops.lora import lora_expand_fused

    return lora_expand_fused(h, b, y, shard_sizes, info.seg_indptr, info.seg_slots, info.max_seg_len)


@dataclass(frozen=True)
class LoRAOps:
    apply: Callable[..., torch.Tensor]     # (x, y, a, b, shard_sizes, info) -> y
    expand: Callable[..., torch.Tensor]    # (h, y, b, shard_sizes, info) -> y
    fuses: bool                            # serving fuses the shrink into unquantized base GEMMs


BACKENDS = {"torch": LoRAOps(lora_torch, expand_torch, fuses=False),
            "triton": LoRAOps(lora_triton, expand_triton, fuses=True)}
