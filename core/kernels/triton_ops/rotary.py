"""Rotary embedding (neox / rotate-half layout) from precomputed cos/sin rows.

x [T, heads, D] (any strides with a contiguous last dim: typically the [q | k] columns of a fused
qkv output viewed as [T, Hq + Hkv, D]); cos/sin [T, 1, D] or [T, D] as RotaryEmbedding.lookup
returns them (halves duplicated; only the first half is read). The cos/sin cache already holds
any scaling (linear, llama3, yarn), so this kernel is the same for every rope type.

    out[..., :h] = x1 * cos - x2 * sin,   out[..., h:] = x2 * cos + x1 * sin   (h = D / 2)

Grid (T, head blocks); the result is a new contiguous [T, heads, D] tensor.

``rotate_and_store`` (the KV write folded in: one launch instead of two): heads Hq.. of x are
the keys; each program also stores its rotated key heads and the matching heads of v [T, Hkv, D]
into the pool's slot loc[t], cast (fp8: scaled and saturated) exactly as kv_write.write_kv does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import pdl_enter, pdl_launch
from kvyard.kernels.triton_ops.kv_write import check_kv_buffers, fp8_store_meta, to_fp8


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, stride_xt, stride_xh, stride_ct, stride_st, stride_ot, stride_oh,
                   HEADS, HALF, V, LOC, K_BUF, V_BUF, stride_vt, stride_vh, stride_kb, stride_vb, HQ, k_inv, v_inv,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, STORE_KV: tl.constexpr = False,
                   FP8: tl.constexpr = False, FMAX: tl.constexpr = 0.0, MANT: tl.constexpr = 0,
                   EMIN: tl.constexpr = 0, PDL: tl.constexpr = False):
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
    o1 = (x1 * cos - x2 * sin).to(OUT.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(OUT.dtype.element_ty)
    o_row = OUT + t * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(o_row, o1, mask=mask)
    tl.store(o_row + HALF, o2, mask=mask)
    if STORE_KV:    # key heads: the rotated key and the same head of v into slot LOC[t]
        kv_head = heads - HQ
        kv_mask = mask & (kv_head >= 0)[:, None]
        slot = tl.load(LOC + t).to(tl.int64)
        k_row = K_BUF + slot * stride_kb + kv_head[:, None] * (2 * HALF) + dims[None, :]
        v_src = V + t * stride_vt + kv_head[:, None] * stride_vh + dims[None, :]
        v_row = V_BUF + slot * stride_vb + kv_head[:, None] * (2 * HALF) + dims[None, :]
        v1 = tl.load(v_src, mask=kv_mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=kv_mask, other=0.0)
        if FP8:
            o1, o2 = to_fp8(o1, k_inv, FMAX, MANT, EMIN), to_fp8(o2, k_inv, FMAX, MANT, EMIN)
            v1, v2 = to_fp8(v1, v_inv, FMAX, MANT, EMIN), to_fp8(v2, v_inv, FMAX, MANT, EMIN)
        tl.store(k_row, o1.to(K_BUF.dtype.element_ty), mask=kv_mask)
        tl.store(k_row + HALF, o2.to(K_BUF.dtype.element_ty), mask=kv_mask)
        tl.store(v_row, v1.to(V_BUF.dtype.element_ty), mask=kv_mask)
        tl.store(v_row + HALF, v2.to(V_BUF.dtype.element_ty), mask=kv_mask)


def _checked(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
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
    return x, cos2, sin2


def _launch(x, cos2, sin2, store=None):
    """store: (v, loc, k_buf, v_buf, k_scale, v_scale) for rotate_and_store."""
    t, heads, dim = x.shape
    out = torch.empty((t, heads, dim), dtype=x.dtype, device=x.device)
    if not t:
        return out
    block_h = min(16, triton.next_power_of_2(heads))
    if store is None:
        kv = (x, x, x, x, 0, 0, 0, 0, heads, 1.0, 1.0)     # unused without STORE_KV
        meta = {}
    else:
        v, loc, k_buf, v_buf, k_scale, v_scale = store
        kv = (v, loc, k_buf, v_buf, v.stride(0), v.stride(1), k_buf.stride(0), v_buf.stride(0),
              heads - k_buf.shape[1], 1.0 / k_scale, 1.0 / v_scale)
        meta = dict(STORE_KV=True, **fp8_store_meta(k_buf.dtype))
    _rotary_kernel[(t, triton.cdiv(heads, block_h))](
        x, cos2, sin2, out, x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0),
        out.stride(0), out.stride(1), heads, dim // 2, *kv,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(dim // 2), **meta, **pdl_launch(x))
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _launch(*_checked(x, cos, sin))


def rotate_and_store(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, v: torch.Tensor, loc: torch.Tensor,
                     k_buf: torch.Tensor, v_buf: torch.Tensor, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """x [T, Hq + Hkv, D] ([q | k] heads) -> rotated x, and the rotated keys and v [T, Hkv, D]
    written to k_buf / v_buf [num_slots, Hkv, D] at slots loc [T] (write_kv's casts and fp8
    scaling; k_scale / v_scale as there)."""
    x, cos2, sin2 = _checked(x, cos, sin)
    t, heads, dim = x.shape
    hkv = k_buf.shape[1]
    if tuple(k_buf.shape[1:]) != (hkv, dim) or tuple(v_buf.shape[1:]) != (hkv, dim) or hkv > heads:
        raise ValueError(f"k_buf {tuple(k_buf.shape)} / v_buf {tuple(v_buf.shape)} do not hold {dim}-wide "
                         f"heads of x {tuple(x.shape)}")
    if tuple(v.shape) != (t, hkv, dim) or v.stride(-1) != 1 or loc.shape != (t,):
        raise ValueError(f"v {tuple(v.shape)} must be [T, Hkv, D] = [{t}, {hkv}, {dim}] with a contiguous "
                         f"last dim, loc [{t}], got loc {tuple(loc.shape)}")
    check_kv_buffers(k_buf, v_buf)
    return _launch(x, cos2, sin2, (v, loc, k_buf, v_buf, k_scale, v_scale))
