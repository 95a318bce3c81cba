"""Triton dequant-GEMM for grouped int4 weights in the canonical layout (kvyard.layers.quant_math).

y [M, N] = x [M, K] @ W^T where W[n, k] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n].

One program computes a [BLOCK_M, BLOCK_N] tile: it walks K in BLOCK_K steps, loads the packed
rows k // 8 of qweight, shifts out nibble k % 8, subtracts the zero and multiplies by the scale of
group g_idx[k] (any order: GPTQ act-order too), and accumulates x_tile @ w_tile in float32
(bf16 / fp16 inputs: a tf32 tensor-core dot, x exact in tf32 and the dequantized weight rounded
to tf32's 10-bit mantissa; float32 inputs: an exact float32 dot). The
weight is read once per M tile, so batch 1 (one M tile, BLOCK_M 16) reads each packed byte once:
a GEMV-shaped launch with small BLOCK_N spreading N over many programs; large M takes 64-row
tiles. Invariants: K % 8 == 0; scales in x's dtype family; the result is cast to x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import tile_offsets


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


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (canonical int4 weight)."""
    m, k = x.shape
    n = qweight.shape[1]
    if k % 8 or qweight.shape[0] * 8 != k:
        raise ValueError(f"int4_gemm: K {k} does not match qweight {tuple(qweight.shape)}")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 64
    block_n = 32 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](x, qweight, scales, zeros, g_idx, y, m, n, k, x.stride(0), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, FP32=x.dtype == torch.float32)
    return y
