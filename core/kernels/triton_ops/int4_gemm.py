"""Triton kernels for grouped int4 weights in the N-major kernel layout.

Layout (what Int4LinearMethod stores; kvyard.layers.quantized_linear.int4_kernel_layout builds
it from the canonical layout of kvyard.layers.quant_math, one transpose of each tensor):
  qweight [N, K/8] int32   row n holds input k of output n in word k // 8, nibble k % 8 (bits
                           4 * (k % 8)), unsigned 0..15: K is contiguous per output row, so a
                           program's rows are long runs of 16-byte loads
  scales  [N, G]           x's dtype family; zeros [N, G] uint8 (0..15); g_idx [K] int32
y [M, N] = x [M, K] @ W^T with W[n, k] = (q[n, k] - zeros[n, g_idx[k]]) * scales[n, g_idx[k]].
Both kernels read this one layout (no second copy for prefill).

Nibbles become floats without an int -> float conversion (a quarter-rate instruction): the
bits q | 0x4B000000 are the float32 2^23 + q, and subtracting 2^23 + z leaves q - z exactly.
The dequantized weight (q - z) * s is then exact in float32 (4-bit by <= 11-bit mantissas).

Decode sizes (M <= GEMV_MAX_M) take ``_int4_gemv_kernel``, autotuned per (M bucket, N, K, split,
group) on CUDA; the runner's eager warm-up of each captured batch size runs the tuning before
CUDA-graph capture. A program owns BLOCK_N output rows and one K split; it walks its split in
BLOCK_K tiles viewed as [BLOCK_N, NG, GW, 8] (NG groups of GW words of 8 nibbles: a tile holds
whole groups, or lies in one), so scales / zeros broadcast without reshapes. Per M bucket:
  M == 1     a CUDA-core multiply into a [BLOCK_N, BLOCK_K] float32 accumulator, summed over K
             once at the end (no padded tensor-core tile, no per-tile reductions);
  M 2..4     the same tile multiplied by each row in turn (static loop), summed per tile;
  M 5..16    a 16-row dot (tf32 for bf16 / fp16 x, x exact in tf32 and the weight rounded to
             tf32's 10-bit mantissa, as the tiled kernel; ieee for float32 x).
K splits write float32 partials that kernels.triton_ops.splitk sums in a fixed order
(deterministic). Sequential groups (g_idx == k // group, every format without act-order,
power-of-two group) read one scale / zero per row and group; otherwise (GPTQ act-order) they
are gathered per input through g_idx.

Larger M takes the tiled kernel ``_int4_gemm_kernel`` (64 x 64 tiles, tf32 / ieee dot, scales
gathered through g_idx). Invariants: K % 8 == 0; results in x's dtype, float32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import tile_offsets
from kvyard.kernels.triton_ops.splitk import plan_split, sm_count, splitk_reduce

GEMV_MAX_M = 16
SPLIT_BLOCK_K = 128        # K splits are multiples of this (configs with BLOCK_K dividing them run)
SPLIT_BLOCK_N = 32         # the row block the split plan assumes (the tuned BLOCK_N may differ)
MAGIC = tl.constexpr(0x4B000000)   # float32 bits of 2^23: (MAGIC | q) is the float 2^23 + q
MAGIC_F = tl.constexpr(8388608.0)  # 2^23


def _cfg(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# per M bucket (BLOCK_M): a handful of tilings the H100 chooses among
GEMV_CONFIGS = {
    1: [_cfg(8, 256, 2, 3), _cfg(16, 256, 4, 3), _cfg(16, 512, 4, 2), _cfg(32, 256, 4, 3),
        _cfg(32, 512, 8, 2), _cfg(64, 128, 4, 4), _cfg(16, 128, 4, 4)],
    2: [_cfg(16, 256, 4, 3), _cfg(32, 256, 4, 2), _cfg(32, 128, 4, 3), _cfg(16, 128, 4, 4)],
    4: [_cfg(16, 256, 4, 3), _cfg(32, 256, 8, 2), _cfg(32, 128, 4, 3), _cfg(16, 128, 4, 4)],
    16: [_cfg(32, 128, 4, 3), _cfg(64, 128, 4, 3), _cfg(32, 256, 4, 2), _cfg(16, 128, 4, 4)],
}
ALL_CONFIGS = [c for cs in GEMV_CONFIGS.values() for c in cs]


def m_bucket(m: int) -> int:
    """BLOCK_M of the GEMV for ``m`` token rows: 1, 2, 4 (CUDA-core paths) or 16 (dot)."""
    return triton.next_power_of_2(m) if m <= 4 else GEMV_MAX_M


def config_fits(cfg: triton.Config, block_m: int, k: int, k_per_split: int) -> bool:
    """Whether ``cfg`` serves bucket ``block_m`` and tiles the split (a split shorter than K must
    be a whole number of BLOCK_K tiles)."""
    in_bucket = any(cfg is c for c in GEMV_CONFIGS[block_m])
    return in_bucket and (k_per_split >= k or k_per_split % cfg.kwargs["BLOCK_K"] == 0)


def _prune(configs, named_args, **kwargs):
    k, kps = named_args["K"], named_args["K_PER_SPLIT"]
    return [c for c in configs if config_fits(c, kwargs["BLOCK_M"], k, kps)]


def _group_shape(a: dict) -> tuple[int, int]:
    """(NG, GW): a BLOCK_K tile as NG groups of GW packed words (NG == 1: one group or gather)."""
    group, bk = a["GROUP"], a["BLOCK_K"]
    ng = bk // group if 0 < group < bk else 1
    return ng, bk // 8 // ng


@triton.jit
def _dequant(words, s_ptr, z_ptr, g_ptr, offs_n, mask_n, G, k0, k_hi, kin,
             GROUP: tl.constexpr, NG: tl.constexpr):
    """words [BN, NG, GW] int32 of inputs kin [NG, GW, 8] (absolute k) -> (q - z) * s as float32
    [BN, NG, GW, 8]."""
    shifts = tl.arange(0, 8) * 4
    bits = ((words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF) | MAGIC
    qf = bits.to(tl.float32, bitcast=True)                           # 2^23 + q
    if GROUP > 0:       # sequential groups: the tile's NG groups, one scale / zero per row each
        gs = k0 // GROUP + tl.arange(0, NG)
        ptr = offs_n[:, None] * G + gs[None, :]
        gm = mask_n[:, None] & (gs[None, :] * GROUP < k_hi)
        s = tl.load(s_ptr + ptr, mask=gm, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + ptr, mask=gm, other=0).to(tl.float32) + MAGIC_F
        w = (qf - z[:, :, None, None]) * s[:, :, None, None]
    else:               # any g_idx (act-order): gather per input
        km = kin < k_hi
        g = tl.load(g_ptr + kin, mask=km, other=0)
        ptr = offs_n[:, None, None, None] * G + g[None, :, :, :]
        gm = mask_n[:, None, None, None] & km[None, :, :, :]
        s = tl.load(s_ptr + ptr, mask=gm, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + ptr, mask=gm, other=0).to(tl.float32) + MAGIC_F
        w = (qf - z) * s
    return w


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, M, N, K, G, K_PER_SPLIT, stride_xm,
                      GROUP: tl.constexpr, PARTIAL: tl.constexpr, FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NG: tl.constexpr, GW: tl.constexpr, EVEN: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = tile_offsets(0, pid_n, M, N, BLOCK_M, BLOCK_N)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)                         # a multiple of 8
    kw = tl.arange(0, NG)[:, None] * GW + tl.arange(0, GW)[None, :]   # [NG, GW] word of the tile
    kt = kw[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]          # [NG, GW, 8] input of the tile
    row_ptr = qw_ptr + offs_n[:, None, None] * (K // 8)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, NG, GW, 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kin = k0 + kt
        if EVEN:
            words = tl.load(row_ptr + (k0 // 8 + kw)[None, :, :])
        else:
            wm = mask_n[:, None, None] & (k0 + kw * 8 < k_hi)[None, :, :]
            words = tl.load(row_ptr + (k0 // 8 + kw)[None, :, :], mask=wm, other=0)
        w = _dequant(words, s_ptr, z_ptr, g_ptr, offs_n, mask_n, G, k0, k_hi, kin, GROUP, NG)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + kin, mask=kin < k_hi, other=0.0).to(tl.float32)
            acc += w * x[None, :, :, :]
        elif BLOCK_M <= 4:
            for m in tl.static_range(BLOCK_M):
                k_row = tl.where(m < M, k_hi, 0)                   # rows past M read nothing
                x = tl.load(x_ptr + m * stride_xm + kin, mask=kin < k_row, other=0.0).to(tl.float32)
                r = tl.sum(tl.sum(tl.sum(w * x[None, :, :, :], axis=3), axis=2), axis=1)   # [BN]
                acc += tl.where(offs_m[:, None] == m, r[None, :], 0.0)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < k_hi), other=0.0).to(tl.float32)
            wt = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)))
            if FP32:
                acc += tl.dot(x, wt, input_precision="ieee")
            else:
                acc += tl.dot(x, wt, input_precision="tf32")
    if BLOCK_M == 1:
        res = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)[None, :]   # [1, BN]
    else:
        res = acc
    out_mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :], res, mask=out_mask)
    else:
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], res.to(out_ptr.dtype.element_ty), mask=out_mask)


_GEMV_HEURISTICS = {
    "NG": lambda a: _group_shape(a)[0],
    "GW": lambda a: _group_shape(a)[1],
    "EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0
    and (a["K_PER_SPLIT"] >= a["K"] or a["K_PER_SPLIT"] % a["BLOCK_K"] == 0),
}
_gemv_fixed = triton.heuristics(_GEMV_HEURISTICS)(_int4_gemv_kernel)     # explicit config (interpreter, tests)
_gemv_tuned = triton.autotune(ALL_CONFIGS, key=["N", "K", "K_PER_SPLIT", "BLOCK_M", "GROUP"],
                              prune_configs_by={"early_config_prune": _prune})(_gemv_fixed)


def _sequential_group(group_size: int) -> int:
    """The GROUP constexpr: a power-of-two group >= 8 is read by row; anything else gathers."""
    return group_size if group_size >= 8 and group_size & (group_size - 1) == 0 else 0


def _int4_gemv(x, qweight, scales, zeros, g_idx, group_size: int, split, config) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    block_m = m_bucket(m)
    plan = plan_split(k, triton.cdiv(n, SPLIT_BLOCK_N), SPLIT_BLOCK_K, sm_count(x.device), split)
    partial = plan.split > 1
    out = (torch.empty(plan.split, m, n, dtype=torch.float32, device=x.device) if partial
           else torch.empty(m, n, dtype=x.dtype, device=x.device))
    args = (x, qweight, scales, zeros, g_idx, out, m, n, k, scales.shape[1], plan.k_per_split, x.stride(0))
    meta = dict(GROUP=_sequential_group(group_size), PARTIAL=partial, FP32=x.dtype == torch.float32,
                BLOCK_M=block_m)
    if config is None and x.is_cuda:
        _gemv_tuned[lambda a: (triton.cdiv(n, a["BLOCK_N"]), plan.split)](*args, **meta)
    else:   # the interpreter (no timing there) or a forced config: the bucket's first fitting one
        cfg = config or next(c for c in GEMV_CONFIGS[block_m] if config_fits(c, block_m, k, plan.k_per_split))
        if not config_fits(cfg, block_m, k, plan.k_per_split):
            raise ValueError(f"int4_gemm: config {cfg.kwargs} does not serve M={m}, K={k}, split {plan}")
        _gemv_fixed[(triton.cdiv(n, cfg.kwargs["BLOCK_N"]), plan.split)](
            *args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return splitk_reduce(out, x.dtype) if partial else out


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, G,
                      stride_xm, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP32: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kw = tl.arange(0, BLOCK_K // 8)
    kt = kw[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]              # [1, BK/8, 8]
    for k0 in range(0, K, BLOCK_K):
        kin = k0 + kt
        km = kin < K
        words = tl.load(qw_ptr + offs_n[:, None, None] * (K // 8) + (k0 // 8 + kw)[None, :, None],
                        mask=mask_n[:, None, None] & (k0 + kw * 8 < K)[None, :, None], other=0)   # [BN, BK/8, 1]
        bits = ((words >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF) | MAGIC
        g = tl.load(g_ptr + kin, mask=km, other=0)
        ptr = offs_n[:, None, None] * G + g
        mk = mask_n[:, None, None] & km
        s = tl.load(s_ptr + ptr, mask=mk, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + ptr, mask=mk, other=0).to(tl.float32) + MAGIC_F
        w = tl.reshape((bits.to(tl.float32, bitcast=True) - z) * s, (BLOCK_N, BLOCK_K))
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if FP32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:   # bf16 / fp16 x: a tf32 tensor-core dot (x is exact in tf32, w nearly)
            acc += tl.dot(x, tl.trans(w), input_precision="tf32")
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              g_idx: torch.Tensor, group_size: int = 0, split: Optional[int] = None,
              config: Optional[triton.Config] = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (kernel layout, module docstring). ``group_size`` > 0
    promises g_idx == k // group_size (the GEMV then reads scales by row); 0: read g_idx.
    M <= 16: the GEMV (``split`` forces its K-split count, ``config`` one of GEMV_CONFIGS for
    the M bucket instead of autotuning: tests and benchmarks); larger M: the tiled kernel."""
    x = _check(x, qweight)
    if x.shape[0] == 0:
        return torch.empty(0, qweight.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0] <= GEMV_MAX_M:
        return _int4_gemv(x, qweight, scales, zeros, g_idx, group_size, split, config)
    return int4_gemm_tiled(x, qweight, scales, zeros, g_idx)


def int4_gemm_tiled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """The tiled kernel at any M (16 x 32 tiles up to 16 rows: benchmarks compare it)."""
    x = _check(x, qweight)
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = (16, 32) if m <= GEMV_MAX_M else (64, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](x, qweight, scales, zeros, g_idx, y, m, n, k, scales.shape[1], x.stride(0), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, FP32=x.dtype == torch.float32)
    return y


def _check(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    k = x.shape[1]
    if k % 8 or qweight.shape[1] * 8 != k:
        raise ValueError(f"int4_gemm: K {k} does not match qweight {tuple(qweight.shape)} ([N, K/8])")
    return x.contiguous()
