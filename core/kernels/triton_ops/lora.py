"""Triton kernels of LoRA serving (kvyard.lora): the segment-gather shrink and expand GEMMs.

One segment per request (its new tokens are contiguous in T); seg_indptr [B + 1] int32 token
offsets, seg_slots [B] int32 adapter slot per segment (-1: base model, skipped). Both kernels
read the indices from device tensors only, and their grid depends only on B, the widths and the
host int ``max_seg_len`` — so a decode graph (max_seg_len 1) captures them once and every replay
serves whatever slots its buffers hold.

    shrink:  xa[t, :]                = x[t, :] @ A[slot(t)].T             A [S, N, K], N = n R
    expand:  y[t, off_k:off_k+size_k] += xa[t, kR:(k+1)R] @ B[slot(t), off_k:off_k+size_k].T
                                                                            B [S, OUT, R]
Each output element is written by exactly one program (no atomics); accumulation in float32.
Rows of base-model segments are left untouched in y and unwritten in xa.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import tile_offsets

BLOCK_M = 16


@triton.jit
def _segment(indptr_ptr, slots_ptr):
    """(slot, first token, length) of this program's segment (grid axis 1)."""
    seg = tl.program_id(1)
    start = tl.load(indptr_ptr + seg)
    return tl.load(slots_ptr + seg), start, tl.load(indptr_ptr + seg + 1) - start


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, indptr_ptr, slots_ptr, N, K,
                   stride_xm, stride_as, stride_an, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot, start, length = _segment(indptr_ptr, slots_ptr)
    if slot < 0:
        return
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    if pid_m * BLOCK_M >= length:
        return
    rows, cols, row_ok, col_ok = tile_offsets(pid_m, pid_n, length, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + (start + rows)[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + cols[None, :] * stride_an + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)     # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, a)          # native dtype operands (bf16/fp16 tensor cores), float32 accumulator
    tl.store(out_ptr + (start + rows)[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _expand_kernel(xa_ptr, b_ptr, y_ptr, indptr_ptr, slots_ptr, starts_ptr, R,
                   stride_xam, stride_bs, stride_bo, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   N_BLOCKS: tl.constexpr):
    shard = tl.program_id(2)
    slot, start, length = _segment(indptr_ptr, slots_ptr)
    if slot < 0:
        return
    pid_m = tl.program_id(0) // N_BLOCKS
    pid_n = tl.program_id(0) % N_BLOCKS
    col0 = tl.load(starts_ptr + shard)
    size = tl.load(starts_ptr + shard + 1) - col0
    if pid_m * BLOCK_M >= length or pid_n * BLOCK_N >= size:
        return
    rows, cols, row_ok, col_ok = tile_offsets(pid_m, pid_n, length, size, BLOCK_M, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    row_off = (start + rows)[:, None].to(tl.int64)
    xa = tl.load(xa_ptr + row_off * stride_xam + shard * R + rs[None, :],
                 mask=row_ok[:, None] & r_ok[None, :], other=0.0)         # [BLOCK_M, BLOCK_R]
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + (col0 + cols)[None, :] * stride_bo + rs[:, None],
                mask=col_ok[None, :] & r_ok[:, None], other=0.0)           # [BLOCK_R, BLOCK_N]
    delta = tl.dot(xa, b)
    y_ptrs = y_ptr + row_off * stride_ym + (col0 + cols)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int, lo: int = 16, hi: int = 128) -> int:
    return min(hi, max(lo, triton.next_power_of_2(n)))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int) -> torch.Tensor:
    """x [T, K], a [S, N, K] -> xa [T, N] (rows of base-model segments unwritten)."""
    t, k = x.shape
    n = a.shape[1]
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    segments = seg_slots.shape[0]
    if t == 0 or segments == 0 or max_seg_len == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_n, block_k = _block(n, hi=64), _block(k, hi=64)
    grid = (triton.cdiv(max_seg_len, BLOCK_M) * triton.cdiv(n, block_n), segments)
    _shrink_kernel[grid](x, a, out, seg_indptr, seg_slots, n, k, x.stride(0), a.stride(0), a.stride(1),
                         out.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


@lru_cache(maxsize=64)
def _shard_starts(sizes: tuple[int, ...], device: str) -> torch.Tensor:
    """[n + 1] int32 first output column of each shard (and the total), one tensor per layout."""
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def lora_expand(xa: torch.Tensor, b: torch.Tensor, y: torch.Tensor, shard_sizes: list[int],
                seg_indptr: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """y [T, OUT] += per shard k: xa[:, kR:(k+1)R] @ b[slot, shard k rows].T; b [S, OUT, R]."""
    segments = seg_slots.shape[0]
    if y.shape[0] == 0 or segments == 0 or max_seg_len == 0:
        return y
    r = b.shape[2]
    starts = _shard_starts(tuple(shard_sizes), str(y.device))
    block_n = _block(max(shard_sizes), hi=64)
    n_blocks = triton.cdiv(max(shard_sizes), block_n)
    grid = (triton.cdiv(max_seg_len, BLOCK_M) * n_blocks, segments, len(shard_sizes))
    _expand_kernel[grid](xa, b, y, seg_indptr, seg_slots, starts, r, xa.stride(0), b.stride(0), b.stride(1),
                         y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_block(r),
                         N_BLOCKS=n_blocks)
    return y
