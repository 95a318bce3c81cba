"""Triton block-scaled fp8 GEMM (128x128-style checkpoints: DeepSeek-V3, Qwen3-FP8).

y [M, N] = sum over K blocks kb of (xq[:, kb] @ wq[:, kb]^T) * sx[:, kb] * sw[:, kb]
  xq [M, K] fp8, sx [M, KB] float32   activations quantized per token and per BLOCK_K inputs
  wq [N, K] fp8, sw [N, KB] float32   per-row block scales (Fp8LinearMethod's storage)
One program computes a [BLOCK_M, BLOCK_N] tile; BLOCK_K equals the checkpoint's block width, so
each K step multiplies by one scale per row of x and per row of w. Invariant: K % BLOCK_K may be
non-zero (the tail is masked); accumulation is float32, the result cast to ``out_dtype``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import tile_offsets


@triton.jit
def _fp8_block_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, M, N, K, KB,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")   # [BM, BN]
        sx = tl.load(sx_ptr + offs_m * KB + kb, mask=mask_m, other=0.0)
        sw = tl.load(sw_ptr + offs_n * KB + kb, mask=mask_n, other=0.0)
        acc += part * sx[:, None] * sw[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def fp8_block_gemm(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                   block_k: int, out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] fp8, sx [M, KB], wq [N, K] fp8, sw [N, KB] -> y [M, N] in out_dtype."""
    m, k = xq.shape
    n, kb = wq.shape[0], sw.shape[1]
    if kb != -(-k // block_k) or sx.shape != (m, kb):
        raise ValueError(f"fp8_block_gemm: scales {tuple(sx.shape)} / {tuple(sw.shape)} do not match K {k} in blocks of {block_k}")
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _fp8_block_kernel[grid](xq.contiguous(), sx.contiguous().float(), wq.contiguous(), sw.contiguous().float(), y,
                            m, n, k, kb, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k)
    return y
