"""fp8 activation quantization in one launch, bit-identical to kvyard.layers.quant_math on CUDA.

  per_token_fp8(x)        x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, 1] float32) with
                          scale = max(amax(|x[m, :]|), 1e-12) * fp32(1 / 448) and q = e4m3(clamp(x / scale))
                          (quant_math.fp8_per_row as torch runs it on CUDA: amax / 448.0, a Python
                          number, is a product with the float32 reciprocal there, a true division
                          on the CPU)
  static_fp8(x, scale)    x [M, K], scale one float32 value on the device -> q [M, K]
                          (quant_math.fp8_quantize with a per-tensor scale)

One program per token row: it reads the row once for the amax (bf16 rows of a few KB: the second
read comes from L1/L2), divides with correct rounding (div_rn, as torch's float32 division) and
rounds to e4m3 itself (``round_to_e4m3``: ties to even, exact), so the fp8 cast only stores an
exactly representable value. The torch version takes several launches and a float32 copy of x;
this one reads x and writes q and the scales, nothing else. CUDA only in production (the callers
keep torch on the CPU); the tests run it under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0
TINY = 1e-12        # quant_math._TINY: the smallest amax (an all-zero row gets scale 1e-12 / 448)
BLOCK = 1024        # K elements per step of a row


@triton.jit
def round_to_fp8(v, MANT: tl.constexpr, EMIN: tl.constexpr):
    """float32 v (|v| <= the format's max) -> the nearest fp8 value (ties to even) as float32, as
    torch's cast rounds; e4m3: MANT 3, EMIN -6; e5m2: MANT 2, EMIN -14. The step of v's binade
    is 2^(e - MANT) (e >= EMIN covers the subnormals); scaling by powers of two is exact, and
    adding then subtracting 1.5 * 2^23 rounds the scaled value to an integer, ties to even; the
    sign is put back afterwards, so a tiny negative value rounds to -0 as in torch. (Triton's
    interpreter does not round fp8 casts correctly, so the kernels round themselves; the result
    is exact in the fp8 format, and the cast after it only stores.)"""
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)
    step = ((e + (127 - MANT)) << 23).to(tl.float32, bitcast=True)     # 2^(e - MANT)
    inv = (((127 + MANT) - e) << 23).to(tl.float32, bitcast=True)      # 2^(MANT - e)
    r = ((a * inv + 12582912.0) - 12582912.0) * step
    # the sign bit ORed back as an integer: a float negation or select of 0.0 may be folded to +0
    # by the GPU compiler (no-signed-zeros), so -0 would come out +0 there
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_to_e4m3(v):
    return round_to_fp8(v, 3, -6)


@triton.jit
def _quantize_row(x_row, q_row, scale, K, BLOCK: tl.constexpr):
    """q_row[k] = e4m3(clamp(x_row[k] / scale, -448, 448)) for k < K."""
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        v = tl.math.div_rn(tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32), scale)
        v = round_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0))
        tl.store(q_row + offs, v.to(q_row.dtype.element_ty), mask=mask)


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        xa = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(xa))
    # torch on CUDA computes quant_math's amax / 448 as amax times the float32 reciprocal
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) * (1.0 / 448.0)
    tl.store(s_ptr + row, scale)
    _quantize_row(x_row, q_ptr + row * stride_qm, scale, K, BLOCK)


@triton.jit
def _static_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _quantize_row(x_ptr + row * stride_xm, q_ptr + row * stride_qm, tl.load(s_ptr), K, BLOCK)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"fp8 quantization: x must be [M, K], got {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, scale [M, 1] float32): quant_math.fp8_per_row."""
    x = _rows(x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        _per_token_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK=min(BLOCK, triton.next_power_of_2(k)))
    return q, scale


def static_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K], scale (one float32 value) -> q [M, K] float8_e4m3fn: quant_math.fp8_quantize."""
    x = _rows(x)
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if m:
        _static_kernel[(m,)](x, q, scale.float().reshape(1), k, x.stride(0), q.stride(0),
                             BLOCK=min(BLOCK, triton.next_power_of_2(k)))
    return q
