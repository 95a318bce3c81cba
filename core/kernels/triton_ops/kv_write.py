"""KV-cache write: the new tokens' k and v into the paged pool in one launch.

k/v [T, Hkv, D] (rows may be strided, each row's Hkv * D values contiguous); loc [T] slots;
k_buf/v_buf [num_slots, Hkv, D]. Row t goes to slot loc[t], cast to the pool's dtype. An fp8
pool (float8_e4m3fn / float8_e5m2) stores k * fp32(1 / k_scale) and v * fp32(1 / v_scale) saturated to
the format's range, bit-identical to the torch expression in mem_cache/kv_pool.py (a float32
product, fp8 rounding to nearest even: fp8_quant.round_to_fp8).
Grid (T, column blocks); k and v are copied by the same program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import pdl_enter, pdl_launch
from kvyard.kernels.triton_ops.fp8_quant import round_to_fp8

BLOCK = 1024
# fp8 pool dtype -> (mantissa bits, smallest normal exponent)
_FP8 = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@triton.jit
def to_fp8(x, inv_scale, FMAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr):
    v = x.to(tl.float32) * inv_scale
    return round_to_fp8(tl.minimum(tl.maximum(v, -FMAX), FMAX), MANT, EMIN)


@triton.jit
def _kv_write_kernel(K, V, LOC, K_BUF, V_BUF, stride_kt, stride_vt, stride_kb, stride_vb, WIDTH,
                     k_inv, v_inv, BLOCK: tl.constexpr, FP8: tl.constexpr, FMAX: tl.constexpr,
                     MANT: tl.constexpr, EMIN: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    slot = tl.load(LOC + t).to(tl.int64)
    k = tl.load(K + t * stride_kt + cols, mask=mask)
    v = tl.load(V + t * stride_vt + cols, mask=mask)
    if FP8:
        k = to_fp8(k, k_inv, FMAX, MANT, EMIN)
        v = to_fp8(v, v_inv, FMAX, MANT, EMIN)
    tl.store(K_BUF + slot * stride_kb + cols, k.to(K_BUF.dtype.element_ty), mask=mask)
    tl.store(V_BUF + slot * stride_vb + cols, v.to(V_BUF.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[T, Hkv, D] -> [T, Hkv * D] with a contiguous row (a view when possible)."""
    flat = x.reshape(x.shape[0], -1)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def fp8_store_meta(pool_dtype: torch.dtype) -> dict:
    """The FP8 / FMAX / MANT / EMIN constexprs of a kernel storing into a pool of ``pool_dtype``
    through to_fp8 (FP8 False and zeros for other pools)."""
    mant, emin = _FP8.get(pool_dtype, (0, 0))
    fp8 = pool_dtype in _FP8
    return dict(FP8=fp8, FMAX=torch.finfo(pool_dtype).max if fp8 else 0.0, MANT=mant, EMIN=emin)


def check_kv_buffers(k_buf: torch.Tensor, v_buf: torch.Tensor) -> None:
    if not (k_buf.is_contiguous() and v_buf.is_contiguous()):
        raise ValueError("k_buf and v_buf must be contiguous [num_slots, Hkv, D] buffers")


def write_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """For an fp8 pool k and v are multiplied by the float32 reciprocals of the scales (ignored
    otherwise); the kernel takes them as float32 arguments, rounded as torch rounds 1.0 / scale."""
    t = loc.shape[0]
    if k.shape[0] != t or v.shape[0] != t:
        raise ValueError(f"k/v rows ({k.shape[0]}, {v.shape[0]}) must equal len(loc) = {t}")
    width = k_buf.shape[1] * k_buf.shape[2]
    k2, v2 = _rows(k), _rows(v)
    if k2.shape[1] != width or v2.shape[1] != width:
        raise ValueError(f"k/v rows hold {k2.shape[1]}/{v2.shape[1]} values, the pool {width}")
    check_kv_buffers(k_buf, v_buf)
    if t:
        block = min(BLOCK, triton.next_power_of_2(width))
        _kv_write_kernel[(t, triton.cdiv(width, block))](
            k2, v2, loc, k_buf, v_buf, k2.stride(0), v2.stride(0), k_buf.stride(0), v_buf.stride(0),
            width, 1.0 / k_scale, 1.0 / v_scale, BLOCK=block, **fp8_store_meta(k_buf.dtype),
            **pdl_launch(k2))
