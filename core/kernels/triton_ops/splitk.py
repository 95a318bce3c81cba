"""Split-K planning and the deterministic split-K reduction of the decode-sized GEMV kernels.

A GEMV (M <= 16 token rows) reads each weight byte once; to keep enough bytes in flight it
spreads K over ``split`` programs per output block. Program s of a split covers the K tiles
[s * tiles, (s + 1) * tiles) and writes float32 partials [split, M, N]; ``splitk_reduce`` sums
them in the fixed order s = 0, 1, ... (no float atomics: the result is bit-identical from run
to run), applies the optional per-row (sx [M] or one scalar) and per-column (sw [N]) scales as
((sum * sx) * sw) and casts to the output dtype. The plan depends on shapes only (and the device's
SM count), never on data: CUDA-graph safe.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

PROGRAMS_PER_SM = 4     # enough programs (each a few weight tiles) to saturate HBM


@dataclass(frozen=True)
class SplitPlan:
    split: int          # programs along K per output block (>= 1)
    k_per_split: int    # a multiple of the K tile; the last split may be shorter (masked)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's SM count (132 on an H100 SXM); CPU tensors (the interpreter) plan for 132."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 132


def plan_split(k: int, n_blocks: int, block_k: int, sms: int, split: Optional[int] = None) -> SplitPlan:
    """Split K (in tiles of ``block_k``) so that n_blocks * split ~ PROGRAMS_PER_SM * sms.
    ``split`` forces a count (tests); it is reduced so that no split is empty."""
    tiles = triton.cdiv(k, block_k)
    want = split if split else max(1, (PROGRAMS_PER_SM * sms) // max(n_blocks, 1))
    per = triton.cdiv(tiles, max(1, min(want, tiles)))
    return SplitPlan(triton.cdiv(tiles, per), per * block_k)


@triton.jit
def _splitk_reduce_kernel(part_ptr, y_ptr, sx_ptr, sw_ptr, M, N, SPLIT, sx_stride,
                          HAS_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):                       # fixed order: deterministic
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_SCALES:
        sx = tl.load(sx_ptr + (offs // N) * sx_stride, mask=mask, other=0.0)
        sw = tl.load(sw_ptr + offs % N, mask=mask, other=0.0)
        acc = acc * sx * sw
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(partials: torch.Tensor, out_dtype: torch.dtype, sx: Optional[torch.Tensor] = None,
                  sw: Optional[torch.Tensor] = None, sx_stride: int = 1) -> torch.Tensor:
    """partials [S, M, N] float32 -> y [M, N] = (sum_s partials[s]) (* sx[m * sx_stride] * sw[n])."""
    s, m, n = partials.shape
    y = torch.empty(m, n, dtype=out_dtype, device=partials.device)
    block = 1024
    has = sx is not None
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        partials, y, sx if has else partials, sw if has else partials, m, n, s, sx_stride,
        HAS_SCALES=has, BLOCK=block)
    return y
