"""Decode-sized W8A8 fp8 GEMV: y [M, N] = fp8(x) @ W^T * sx * sw for M <= 16 token rows.

  x  [M, K]  bf16 / fp16 / fp32 activations, quantized inside the kernel
  w  [N, K]  float8_e4m3fn weight, sw [N] float32 per-channel scales
  sx         dynamic: per token, amax(|x[m, :]|) / 448 (clamped to 1e-12), exactly as
             quant_math.fp8_per_row; static: one float32 scale read from the device
One launch (plus the split-K reduction when K is split, kernels.triton_ops.splitk): program
(n block, split s) computes its rows' scales itself (x is a few KB, read from L2), quantizes its
K slice of x with correctly rounded division and round-to-nearest-even to e4m3 (bit-identical to
torch), and multiplies with its [BLOCK_N, K slice] weight tile. The fp8 values are converted to
bf16 (exact) for a tensor-core dot with float32 accumulation, so every product is exact and only
the float32 sums round: the result equals the float32 emulation ((xq @ w^T) * sx * sw) to float32
rounding. The weight is the dot's left operand (``w @ xq^T``, swap-AB): N fills the tensor core's
rows, the 16 token rows its columns. Program (0, 0) writes the dynamic scales sx [M] for the
reduction; every program computes the same values.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.splitk import plan_split, sm_count, splitk_reduce

MAX_M = 16
BLOCK_N, BLOCK_K, BLOCK_AMAX = 64, 128, 512
# sm_90 ptxas takes all 255 registers for this kernel unless capped; 128 spills nothing (checked
# with cuobjdump on the compiled cubin) and lets 4 programs of 4 warps share an SM
MAX_REGS = 128


@triton.jit
def _row_scales(x_ptr, offs_m, mask_m, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_AMAX: tl.constexpr):
    """Per-row amax(|x|) / 448 over all of K: [BLOCK_M] float32 (rows past M: 1e-12 / 448)."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_AMAX):
        offs = k0 + tl.arange(0, BLOCK_AMAX)
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs[None, :],
                     mask=mask_m[:, None] & (offs[None, :] < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(xa), axis=1))
    return tl.math.div_rn(tl.maximum(amax, 1e-12), tl.full((BLOCK_M,), 448.0, tl.float32))


@triton.jit
def _round_to_e4m3(v):
    """float32 v (|v| <= 448) -> the nearest e4m3 value (ties to even) as float32, as torch's
    cast rounds. The step of v's binade is 2^(e - 3) (3 mantissa bits; e >= -6 covers the
    subnormals); scaling by powers of two is exact, and adding then subtracting 1.5 * 2^23
    rounds the scaled value to an integer, ties to even. (Triton's interpreter does not round
    fp8 casts correctly, so the kernel rounds itself; the result is exact in float16.)"""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)           # 2^(e - 3)
    inv = ((130 - e) << 23).to(tl.float32, bitcast=True)            # 2^(3 - e)
    return ((v * inv + 12582912.0) - 12582912.0) * step


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, sw_ptr, sx_in_ptr, sx_out_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                     stride_xm, DYNAMIC: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_AMAX: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if DYNAMIC:
        scale = _row_scales(x_ptr, offs_m, mask_m, K, stride_xm, BLOCK_M, BLOCK_AMAX)
        if (pid_n == 0) & (pid_s == 0):
            tl.store(sx_out_ptr + offs_m, scale, mask=mask_m)
    else:
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(sx_in_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                     mask=mask_m[None, :] & mask_k[:, None], other=0.0).to(tl.float32)   # [BK, BM]
        xq = tl.math.div_rn(xt, scale[None, :])
        xq = _round_to_e4m3(tl.minimum(tl.maximum(xq, -448.0), 448.0)).to(tl.float16)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float16)     # [BN, BK]
        acc += tl.dot(w, xq)                                                            # [BN, BM]
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + offs_m[None, :] * N + offs_n[:, None], acc,
                 mask=mask_n[:, None] & mask_m[None, :])
    else:
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
        y = acc * scale[None, :] * sw[:, None]
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], y.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_m[None, :])


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, input_scale: Optional[torch.Tensor] = None,
             out_dtype: Optional[torch.dtype] = None, split: Optional[int] = None) -> torch.Tensor:
    """x [M, K] (M <= 16), w [N, K] e4m3, sw [N] float32 -> y [M, N] in out_dtype (x's dtype).
    ``input_scale`` (float32, one value): static activations; None: dynamic per token.
    ``split`` forces the split-K count (tests); None plans it from the shapes."""
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_M or w.shape[1] != k or sw.numel() != n:
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)}, w {tuple(w.shape)}, sw {tuple(sw.shape)} "
                         f"(M <= {MAX_M}, K and N must match)")
    x = x if x.stride(1) == 1 else x.contiguous()
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x.device)
    plan = plan_split(k, triton.cdiv(n, BLOCK_N), BLOCK_K, sm_count(x.device), split)
    dynamic = input_scale is None
    sx = torch.empty(m, dtype=torch.float32, device=x.device) if dynamic else input_scale.reshape(1)
    partial = plan.split > 1
    out = (torch.empty(plan.split, m, n, dtype=torch.float32, device=x.device) if partial
           else torch.empty(m, n, dtype=out_dtype, device=x.device))
    _fp8_gemv_kernel[(triton.cdiv(n, BLOCK_N), plan.split)](
        x, w, sw, sx, sx, out, m, n, k, plan.k_per_split, x.stride(0), DYNAMIC=dynamic, PARTIAL=partial,
        BLOCK_M=MAX_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_AMAX=BLOCK_AMAX, maxnreg=MAX_REGS)
    if not partial:
        return out
    return splitk_reduce(out, out_dtype, sx, sw, sx_stride=1 if dynamic else 0)
