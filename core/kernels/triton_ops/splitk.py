"""Split-K planning and the deterministic split-K reduction of the decode-sized GEMV kernels.

A GEMV (M <= 16 token rows) reads each weight byte once; to keep enough bytes in flight it
spreads K over ``split`` programs per output block. Program s of a split covers the K tiles
[s * tiles, (s + 1) * tiles) and writes float32 partials [split, M, N] (already scaled: the
GEMVs apply their scales before storing); the partials are summed in the fixed order s = 0, 1,
... (no float atomics: the result is bit-identical from run to run) and cast to the output
dtype. ``split_buffers`` allocates a launch's result, partials and counters. The plan depends
on shapes only (and the device's SM count), never on data: CUDA-graph safe.

Two ways to sum, the same bits:
  * ``splitk_reduce``: a second launch over the partials (any caller; the fallback);
  * ``splitk_store`` inside the GEMV itself (one launch): each split program stores its partial
    tile, then increments the tile's int32 arrival counter (acq_rel, gpu scope: the release
    orders the partial stores before the increment, the acquire orders the last program's loads
    after every other program's stores). The program that reads back S - 1 arrived last: it
    loads the S partials in order s = 0, 1, ... bypassing L1 (``.cg``: L1 is not coherent across
    SMs), stores y and resets the counter to 0. On the GPU a CTA barrier precedes the scalar
    atomic (Triton issues it from one thread) so every thread's partial stores come before it.

Counter invariant: ``tile_counters(device)`` is one int32 buffer per device, all zero between
launches. Every launch that uses it resets each counter it incremented (the last arrival of a
tile resets it), so the next launch, or the next replay of a CUDA graph, starts from zero. The
GEMVs run on one stream in order, so two launches never use the counters at the same time;
a launch must not be split across streams that run concurrently. The buffer is made on first
use outside any CUDA-graph capture (the runner warms every shape up eagerly before capturing).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

PROGRAMS_PER_SM = 4     # enough programs (each a few weight tiles) to saturate HBM
COUNTER_SLOTS = 1 << 16  # output tiles one fused launch may count (more: the two-launch path)


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
def _splitk_reduce_kernel(part_ptr, y_ptr, M, N, SPLIT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):                       # fixed order: deterministic
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(partials: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """partials [S, M, N] float32 -> y [M, N] = sum_s partials[s], in out_dtype."""
    s, m, n = partials.shape
    y = torch.empty(m, n, dtype=out_dtype, device=partials.device)
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](partials, y, m, n, s, BLOCK=block)
    return y


@functools.lru_cache(maxsize=None)
def _counters(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"splitk: the tile counters of {device} would be allocated inside a CUDA-graph "
                           "capture; run the GEMV once eagerly before capturing (the runner's warm-up does)")
    return torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)


def tile_counters(device: torch.device) -> torch.Tensor:
    """The device's int32 arrival counters [COUNTER_SLOTS], all zero between launches (module
    docstring); made once per device, on first use outside a CUDA-graph capture."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _counters(device)


def counters_fit(n_tiles: int) -> bool:
    """Whether a launch of ``n_tiles`` output tiles (at the smallest tile its configs may pick)
    can sum its split in the same launch: every tile needs its own counter."""
    return n_tiles <= COUNTER_SLOTS


def split_buffers(m: int, n: int, split: int, out_dtype: torch.dtype, device: torch.device,
                  fuse_reduce: bool, min_block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(y, part, cnt, fuse) for a GEMV launch of ``split`` K splits: y [M, N] in out_dtype; part
    the float32 partials [split, M, N] (y itself when unsplit); cnt the tile counters whenever K
    is split, fused or not (Triton's autotuner keys on argument dtypes: both forms then share one
    tuned tiling, so one summation order); fuse whether the launch sums the split itself (asked
    for, and a counter for every tile of the narrowest tiling, ``min_block_n`` wide)."""
    y = torch.empty(m, n, dtype=out_dtype, device=device)
    if split == 1:
        return y, y, y, False
    part = torch.empty(split, m, n, dtype=torch.float32, device=device)
    return y, part, tile_counters(device), fuse_reduce and counters_fit(triton.cdiv(n, min_block_n))


@triton.jit
def splitk_store(part_ptr, y_ptr, cnt_ptr, res, offs, mask, tile, pid_s, MN, SPLIT, FUSE: tl.constexpr):
    """Store split ``pid_s``'s float32 partial ``res`` at part_ptr + pid_s * MN + offs (offs =
    m * N + n, the tile's elements; ``mask`` those inside [M, N]). FUSE: count the arrival at
    cnt_ptr + tile; the last of the SPLIT programs of the tile sums the S partials in order
    s = 0, 1, ... (from 0.0, as _splitk_reduce_kernel: the same bits), casts, stores y at
    y_ptr + offs and resets the counter to 0."""
    tl.store(part_ptr + pid_s * MN + offs, res, mask=mask)
    if FUSE:
        tl.debug_barrier()          # all threads' partial stores, then one thread's release
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:    # every other split of the tile has stored its partial
            acc = tl.zeros_like(res)
            for s in range(0, SPLIT):                   # fixed order: deterministic
                acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile, 0)                 # the next launch / graph replay starts at 0
