"""Triton dequant-GEMM for grouped int4 weights in the canonical layout (kvyard.layers.quant_math).

y [M, N] = x [M, K] @ W^T where W[n, k] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n].

One program computes a [BLOCK_M, BLOCK_N] tile: it walks K in BLOCK_K steps, loads the packed
rows k // 8 of qweight, shifts out nibble k % 8, subtracts the zero and multiplies by the scale of
group g_idx[k] (any order: GPTQ act-order too), and accumulates x_tile @ w_tile in float32
(bf16 / fp16 inputs: a tf32 tensor-core dot, x exact in tf32 and the dequantized weight rounded
to tf32's 10-bit mantissa; float32 inputs: an exact float32 dot), in 64 x 64 tiles (M > 16).
``int4_gemm_tiled`` runs it at any M (16 x 32 tiles up to 16 rows; benchmarks compare).
Invariants: K % 8 == 0; scales in x's dtype family; the result is cast to x's dtype.

Decode sizes (M <= 16) take a split-K GEMV instead (``_int4_gemv_kernel``): the tiled kernel's
one program per N block walks all of K serially, too few programs to fill the memory system.
The GEMV gives each (N block, K split) pair a program that loads its packed [BLOCK_K / 8,
BLOCK_N] words once, unpacks the 8 nibbles of each word in registers, and writes float32
partials that kernels.triton_ops.splitk sums in a fixed order (deterministic). With sequential
groups (g_idx = k // group, every format without act-order) it loads one scale / zero row per
group instead of gathering them per input. Its arithmetic is the tiled kernel's (the same
dequantization and dot precision); only the float32 summation order differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import tile_offsets
from kvyard.kernels.triton_ops.splitk import plan_split, sm_count, splitk_reduce

GEMV_MAX_M = 16
GEMV_BLOCK_N, GEMV_BLOCK_K = 64, 128


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K,
                      stride_xm, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP32: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mk = mask_k[:, None] & mask_n[None, :]
        packed = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mk, other=0)
        q = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mk, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mk, other=0).to(tl.int32)
        w = (q - zero).to(tl.float32) * scale                      # [BLOCK_K, BLOCK_N]
        if FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:   # bf16 / fp16 x: a tf32 tensor-core dot (x is exact in tf32, w nearly)
            acc += tl.dot(x.to(tl.float32), w, input_precision="tf32")
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_tile(q, s_ptr, z_ptr, g_ptr, offs_k, mask_k, k0, k_hi, offs_n, mask_n, N,
                  GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """q [BLOCK_K, BLOCK_N] nibbles of inputs offs_k -> (q - zero) * scale, float32."""
    if GROUP >= BLOCK_K:          # the tile lies in group k0 // GROUP: one row
        g = k0 // GROUP
        scale = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        w = (q - zero[None, :]).to(tl.float32) * scale[None, :]
    elif GROUP > 0:               # BLOCK_K / GROUP whole groups
        gs = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        gm = (gs[:, None] * GROUP < k_hi) & mask_n[None, :]
        scale = tl.load(s_ptr + gs[:, None] * N + offs_n[None, :], mask=gm, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + gs[:, None] * N + offs_n[None, :], mask=gm, other=0).to(tl.int32)
        qg = tl.reshape(q, (BLOCK_K // GROUP, GROUP, BLOCK_N))
        w = tl.reshape((qg - zero[:, None, :]).to(tl.float32) * scale[:, None, :], (BLOCK_K, BLOCK_N))
    else:                         # any g_idx (act-order): gather per input
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        mk = mask_k[:, None] & mask_n[None, :]
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mk, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mk, other=0).to(tl.int32)
        w = (q - zero).to(tl.float32) * scale
    return w


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, M, N, K, K_PER_SPLIT, stride_xm,
                      GROUP: tl.constexpr, PARTIAL: tl.constexpr, FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(0, pid_n, M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)                     # a multiple of 8
    shifts = tl.arange(0, 8) * 4
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :],
                         mask=(rows[:, None] < k_hi // 8) & mask_n[None, :], other=0)   # [BK/8, BN]
        q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        w = _dequant_tile(q, s_ptr, z_ptr, g_ptr, offs_k, mask_k, k0, k_hi, offs_n, mask_n, N,
                          GROUP, BLOCK_K, BLOCK_N)
        if FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float32), w, input_precision="tf32")
    out_mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)
    else:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _int4_gemv(x, qweight, scales, zeros, g_idx, group_size: int, split) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[1]
    bk = GEMV_BLOCK_K
    group = group_size if group_size and (group_size % bk == 0 or bk % group_size == 0) else 0
    plan = plan_split(k, triton.cdiv(n, GEMV_BLOCK_N), bk, sm_count(x.device), split)
    partial = plan.split > 1
    out = (torch.empty(plan.split, m, n, dtype=torch.float32, device=x.device) if partial
           else torch.empty(m, n, dtype=x.dtype, device=x.device))
    _int4_gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), plan.split)](
        x, qweight, scales, zeros, g_idx, out, m, n, k, plan.k_per_split, x.stride(0),
        GROUP=group, PARTIAL=partial, FP32=x.dtype == torch.float32,
        BLOCK_M=GEMV_MAX_M, BLOCK_N=GEMV_BLOCK_N, BLOCK_K=bk)
    return splitk_reduce(out, x.dtype) if partial else out


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor, group_size: int = 0, split: Optional[int] = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (canonical int4 weight). ``group_size`` > 0 promises
    g_idx == k // group_size (the GEMV then reads scales by row); 0: read g_idx. M <= 16: the
    split-K GEMV (``split`` forces its split count: tests); larger M: the tiled kernel."""
    x = _check(x, qweight)
    if x.shape[0] == 0:
        return torch.empty(0, qweight.shape[1], dtype=x.dtype, device=x.device)
    if x.shape[0] <= GEMV_MAX_M:
        return _int4_gemv(x, qweight, scales, zeros, g_idx, group_size, split)
    return int4_gemm_tiled(x, qweight, scales, zeros, g_idx)


def int4_gemm_tiled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """The tiled kernel at any M (16 x 32 tiles up to 16 rows: what decode ran before the GEMV)."""
    x = _check(x, qweight)
    m, k = x.shape
    n = qweight.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = (16, 32) if m <= GEMV_MAX_M else (64, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](x, qweight, scales, zeros, g_idx, y, m, n, k, x.stride(0), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, FP32=x.dtype == torch.float32)
    return y


def _check(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    k = x.shape[1]
    if k % 8 or qweight.shape[0] * 8 != k:
        raise ValueError(f"int4_gemm: K {k} does not match qweight {tuple(qweight.shape)}")
    return x.contiguous()
