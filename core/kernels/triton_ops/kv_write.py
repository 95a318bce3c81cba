"""KV-cache write: the new tokens' k and v into the paged pool in one launch.

k/v [T, Hkv, D] (rows may be strided, each row's Hkv * D values contiguous); loc [T] slots;
k_buf/v_buf [num_slots, Hkv, D]. Row t goes to slot loc[t], cast to the pool's dtype.
Grid (T, column blocks); k and v are copied by the same program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _kv_write_kernel(K, V, LOC, K_BUF, V_BUF, stride_kt, stride_vt, stride_kb, stride_vb, WIDTH,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    slot = tl.load(LOC + t).to(tl.int64)
    k = tl.load(K + t * stride_kt + cols, mask=mask)
    v = tl.load(V + t * stride_vt + cols, mask=mask)
    tl.store(K_BUF + slot * stride_kb + cols, k.to(K_BUF.dtype.element_ty), mask=mask)
    tl.store(V_BUF + slot * stride_vb + cols, v.to(V_BUF.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[T, Hkv, D] -> [T, Hkv * D] with a contiguous row (a view when possible)."""
    flat = x.reshape(x.shape[0], -1)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def write_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    t = loc.shape[0]
    if k.shape[0] != t or v.shape[0] != t:
        raise ValueError(f"k/v rows ({k.shape[0]}, {v.shape[0]}) must equal len(loc) = {t}")
    width = k_buf.shape[1] * k_buf.shape[2]
    k2, v2 = _rows(k), _rows(v)
    if k2.shape[1] != width or v2.shape[1] != width:
        raise ValueError(f"k/v rows hold {k2.shape[1]}/{v2.shape[1]} values, the pool {width}")
    if not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        raise ValueError("k_buf and v_buf must be contiguous [num_slots, Hkv, D] buffers")
    if t:
        block = min(BLOCK, triton.next_power_of_2(width))
        _kv_write_kernel[(t, triton.cdiv(width, block))](
            k2, v2, loc, k_buf, v_buf, k2.stride(0), v2.stride(0), k_buf.stride(0), v_buf.stride(0),
            width, BLOCK=block)
