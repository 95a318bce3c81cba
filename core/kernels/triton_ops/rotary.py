"""Rotary embedding (neox / rotate-half layout) from precomputed cos/sin rows.

x [T, heads, D] (any strides with a contiguous last dim: typically the [q | k] columns of a fused
qkv output viewed as [T, Hq + Hkv, D]); cos/sin [T, 1, D] or [T, D] as RotaryEmbedding.lookup
returns them (halves duplicated; only the first half is read). The cos/sin cache already holds
any scaling (linear, llama3, yarn), so this kernel is the same for every rope type.

    out[..., :h] = x1 * cos - x2 * sin,   out[..., h:] = x2 * cos + x1 * sin   (h = D / 2)

Grid (T, head blocks); the result is a new contiguous [T, heads, D] tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import pdl_enter, pdl_launch


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
                   HEADS, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    mask = (heads < HEADS)[:, None] & dim_ok[None, :]
    cos = tl.load(COS + t * stride_ct + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + t * stride_st + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    x_row = X + t * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    o_row = OUT + t * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(o_row, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"x must be [T, heads, head_dim], got shape {tuple(x.shape)}")
    t, heads, dim = x.shape
    if dim % 2:
        raise ValueError(f"head_dim must be even, got {dim}")
    cos2, sin2 = cos.reshape(t, -1), sin.reshape(t, -1)
    if cos2.shape[1] < dim // 2 or sin2.shape[1] < dim // 2:
        raise ValueError(f"cos/sin rows must hold at least head_dim / 2 = {dim // 2} values")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos2, sin2 = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos2, sin2))
    out = torch.empty((t, heads, dim), dtype=x.dtype, device=x.device)
    if t:
        block_h = min(16, triton.next_power_of_2(heads))
        _rotary_kernel[(t, triton.cdiv(heads, block_h))](
            x, cos2, sin2, out, x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0),
            out.stride(0), out.stride(1), heads, dim // 2,
            BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(dim // 2), **pdl_launch(x))
    return out
