"""RMSNorm with the fused residual add: one program per row.

    summed = x + residual                  (rounded to the activation dtype, returned)
    normed = (summed_f32 * rsqrt(mean(summed_f32^2) + eps)).to(dtype) * weight

The order of operations is the torch path's (layers/norm.py), so both agree up to the order of
the mean's summation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import block_for, pdl_enter, pdl_launch, rows_2d, warps_for


@triton.jit
def _rmsnorm_kernel(X, R, W, OUT, SUM, stride_x, stride_r, stride_o, stride_s, N, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(SUM.dtype.element_ty)
        tl.store(SUM + row * stride_s + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / N
    normed = (x * tl.rsqrt(variance + eps)).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (normed * w).to(OUT.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: Optional[torch.Tensor] = None):
    """x [..., N] -> normed; with ``residual`` (same shape) -> (normed, x + residual)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n}")
    x2 = rows_2d(x)
    if residual is None:
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        r2, summed = x2, out  # unused by the kernel when HAS_RESIDUAL is false
    else:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        r2 = rows_2d(residual)
        # like torch: the sum takes the promoted dtype and the norm keeps it
        summed = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        out = torch.empty_like(summed)
    block = block_for(n)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, summed, x2.stride(0), r2.stride(0), out.stride(0), summed.stride(0),
            n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps_for(block), **pdl_launch(x2))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), summed.view(x.shape)
