"""Quantize / dequantize / pack arithmetic shared by the quantized linear methods.

Conventions (PyTorch orientation): a weight is [N out, K in]; an activation is [M, K].
Scales multiply: float = q * scale (fp8, int8) or (q - zero) * scale (int4). Every scale is
float32 unless stated. Rounding is round-half-to-even (torch.round), as the published tools do.

int4 canonical layout (what every 4-bit format is converted to at load, and what the CPU path
and the Triton dequant-GEMM read):
  qweight [K/8, N] int32   element k of column n is nibble k % 8 of row k // 8 (bits 4*(k%8)),
                           unsigned 0..15 (GPTQ's packing)
  scales  [G, N]           the layer dtype
  zeros   [G, N] uint8     unsigned zero points 0..15 (8 for symmetric formats)
  g_idx   [K] int32        group of input k (k // group_size unless GPTQ act-order permutes it)
"""
from __future__ import annotations

import torch

FP8_E4M3 = torch.float8_e4m3fn
FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max   # 448
INT8_MAX = 127.0
_TINY = 1e-12


# -- fp8 -------------------------------------------------------------------------------------
def fp8_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = FP8_E4M3) -> torch.Tensor:
    """x / scale saturated to the fp8 range (scale broadcasts against x)."""
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


def fp8_per_row(x: torch.Tensor, dtype: torch.dtype = FP8_E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (q [R, C] fp8, scale [R, 1] float32) with each row's amax mapped to the fp8 max.
    Serves per-channel weights (rows = output channels) and per-token activations alike."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY)
    scale = amax / torch.finfo(dtype).max
    return fp8_quantize(x, scale, dtype), scale


def fp8_per_tensor(x: torch.Tensor, dtype: torch.dtype = FP8_E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q fp8, scale [] float32)."""
    scale = x.abs().amax().float().clamp(min=_TINY) / torch.finfo(dtype).max
    return fp8_quantize(x, scale, dtype), scale


def fp8_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] fp8, scale [M, ceil(K / group)]): one scale per token and per
    ``group`` consecutive inputs (the activation side of 128x128 block-scaled checkpoints)."""
    m, k = x.shape
    pad = (-k) % group
    xp = torch.nn.functional.pad(x.float(), (0, pad)).view(m, -1, group)
    q, scale = fp8_per_row(xp)
    return q.view(m, -1)[:, :k], scale.squeeze(-1)


def expand_block_scales(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(rows/bn), ceil(cols/bk)] -> per-row [rows, ceil(cols/bk)] (each row
    gets its block row's scales), so shards of any size concatenate along rows."""
    bn, _ = block
    return scale.float().repeat_interleave(bn, dim=0)[:rows]


def dequantize_block(q: torch.Tensor, row_scales: torch.Tensor, block_k: int) -> torch.Tensor:
    """q [N, K] with per-row block scales [N, ceil(K/bk)] -> float32 [N, K]."""
    k = q.shape[1]
    return q.float() * row_scales.repeat_interleave(block_k, dim=1)[:, :k]


# -- int8 ------------------------------------------------------------------------------------
def int8_per_row(x: torch.Tensor, qmax: float = INT8_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: x [R, C] -> (q [R, C] int8, scale [R, 1] float32), scale = amax / qmax
    (127: q in [-127, 127]; compressed-tensors uses 127.5 and clamps to [-128, 127])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY)
    scale = amax / qmax
    q = torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def int8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b_t [K, N] int8 -> int32 [M, N]. CUDA's _int_mm wants M > 16 and K, N
    multiples of 8: smaller problems are padded (rows) or computed exactly in float64."""
    m, k = a.shape
    if a.is_cuda:
        if k % 8 or b_t.shape[1] % 8:
            return (a.double() @ b_t.double()).to(torch.int32)
        if m <= 16:
            a = torch.nn.functional.pad(a, (0, 0, 0, 17 - m))
            return torch._int_mm(a, b_t)[:m]
    return torch._int_mm(a, b_t)


# -- int4 ------------------------------------------------------------------------------------
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R/8, C] int32 (nibble i of row r is element 8r + i) -> [R, C] int32 0..15."""
    r8, c = packed.shape
    nib = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, 8, 1)) & 0xF
    return nib.reshape(r8 * 8, c)


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints 0..15 (R a multiple of 8) -> [R/8, C] int32: the inverse of unpack_int4_rows."""
    r, c = values.shape
    v = values.to(torch.int32).view(r // 8, 8, c) << _SHIFTS.to(values.device).view(1, 8, 1)
    return v.sum(dim=1, dtype=torch.int32)   # disjoint bits: the sum is the bitwise or


def unpack_int4_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C/8] int32 packed along columns -> [R, C] int32 0..15. ``order[i]`` is the column
    (within each group of 8) that nibble i holds; None: nibble i holds column i."""
    r, c8 = packed.shape
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF          # [R, C/8, 8] by nibble
    if order is not None:
        inverse = [0] * 8
        for nibble, col in enumerate(order):
            inverse[col] = nibble
        nib = nib[..., inverse]                                                 # by column
    return nib.reshape(r, c8 * 8)


def pack_int4_cols(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of unpack_int4_cols."""
    r, c = values.shape
    v = values.to(torch.int32).view(r, c // 8, 8)
    if order is not None:
        v = v[..., list(order)]                                                 # by nibble
    return (v << _SHIFTS.to(values.device)).sum(dim=-1, dtype=torch.int32)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Canonical int4 (module docstring) -> dense [N, K] in ``dtype``."""
    q = unpack_int4_rows(qweight)                                              # [K, N]
    g = g_idx.long()
    w = (q - zeros[g].to(torch.int32)).to(scales.dtype) * scales[g]            # [K, N]
    return w.t().to(dtype)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest reference quantizer: w [N, K] -> (q [N, K] 0..15, scales [N, K/group]
    float32, zeros [N, K/group] 0..15). Symmetric: zero 8 and scale amax / 7 (GPTQ's rule,
    as in its sym mode); asymmetric: the min..max range over 15 steps."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    if symmetric:
        scale = (g.abs().amax(-1) / 7).clamp(min=_TINY)
        zero = torch.full_like(scale, 8)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=_TINY)
        zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15)
    return q.view(n, k).to(torch.int32), scale, zero.to(torch.int32)
