"""Decode-sized weight-only fp8 GEMV (w8a16): y [M, N] = x @ dequant(w)^T for M <= 16 token rows.

  x   [M, K]  bf16 / fp16 / fp32 activations, used as they are (no activation quantization)
  w   [N, K]  float8_e4m3fn, row-major (K contiguous)
  sw  [N]     float32 per-row scales (per-channel; a per-tensor scale repeated over the rows), or
      [N, KB] float32 per-row block scales, KB = ceil(K / SCALE_K) (128x128 block-scaled
              checkpoints after kvyard.layers.quant_math.expand_block_scales)
  y           float32 accumulation, scaled at the end (per-row) or per K tile (block scales),
              cast to out_dtype

Decode is bound by reading w: each program owns BLOCK_N weight rows (4-64: hundreds of programs
for N >= 4096) and walks K in long contiguous BLOCK_K slices (16-byte vector loads). Two bodies:
  M == 1      CUDA cores: a [BLOCK_N, BLOCK_K] float32 product accumulated elementwise, one row
              sum at the end (no padded tensor-core tile)
  2 <= M <=16 a tensor-core dot w_tile [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, 16] with the fp8 tile
              converted to x's dtype (exact: every e4m3 value is a bf16 / fp16 / fp32 value)
Products of an e4m3 value and a bf16 / fp16 value are exact in float32: the result equals the
float32 reference x.float() @ (w.float() * sw).T up to the order of the float32 sums.

The tile sizes come from @triton.autotune (key: the M body, the scale layout, N, K, the split):
the first call of a shape times the configs (once per machine: the choice is cached on disk).
The model runner runs every captured batch size eagerly before CUDA-graph capture
(executor.cuda_graph_runner: warm-up runs), so tuning never happens inside a capture (a shape
first seen inside one takes a fixed config); the plan depends on shapes only, never on data.

Split-K only where N is small (N < SPLIT_BELOW_N: too few row blocks to fill the device): split s
covers K in [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT), stores scaled float32 partials [S, M, N],
and the tile's last split program sums them in a fixed order in the same launch
(kernels.triton_ops.splitk.splitk_store: deterministic; the two-launch splitk_reduce with
``fuse_reduce=False`` or where the counters do not fit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from kvyard.kernels.triton_ops.common import may_autotune
from kvyard.kernels.triton_ops.splitk import split_buffers, splitk_reduce, splitk_store

MAX_M = 16
SPLIT_BELOW_N = 2048      # fewer output rows than this: split K
SPLIT_K_STEP = 512        # K_PER_SPLIT is a multiple of this (and so of every BLOCK_K)
MAX_SPLIT = 8


def _configs() -> list[triton.Config]:
    """A handful per body: M == 1 keeps BLOCK_N * BLOCK_K <= 8192 (the float32 product tile
    stays in registers); the dot body needs BLOCK_N >= 16; the last serves block scales as
    narrow as 32 columns."""
    out = []
    for bn, bk, warps, stages in ((4, 512, 2, 4), (8, 256, 2, 4), (8, 512, 4, 3), (16, 256, 4, 3),
                                  (16, 512, 8, 2), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 4, 4),
                                  (16, 128, 4, 4), (16, 32, 2, 4)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


CONFIGS = _configs()
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONFIGS)


def config_fits(cfg: triton.Config, block_m: int, scale_k: int) -> bool:
    """Whether a config serves this body and scale layout: the dot body needs BLOCK_N >= 16;
    M == 1 keeps its product tile <= 8192 values; a K tile never straddles a scale block."""
    bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    if block_m > 1 and bn < 16:
        return False
    if block_m == 1 and bn * bk > 8192:
        return False
    return scale_k == 0 or (bk <= scale_k and scale_k % bk == 0)


def _prune(configs, named_args, **kwargs):
    return [c for c in configs if config_fits(c, kwargs["BLOCK_M"], kwargs["SCALE_K"])]


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, sw_ptr, out_ptr, y_ptr, cnt_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_sw,
                  SCALE_K: tl.constexpr, PARTIAL: tl.constexpr, FUSE: tl.constexpr, BLOCK_M: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K                       # [BN, 1]
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)               # per-lane partial sums
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if SCALE_K > 0:        # block scales: one per row for this K tile (the tile lies in one block)
            s = tl.load(sw_ptr + offs_n * stride_sw + k0 // SCALE_K, mask=mask_n, other=0.0)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            prod = w.to(tl.float32) * x[None, :]                               # [BN, BK]
            if SCALE_K > 0:
                prod = prod * s[:, None]
            acc2 += prod
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                         mask=mask_m[None, :] & mask_k[:, None], other=0.0)        # [BK, BM]
            if IEEE:           # float32 operands, no tf32 rounding
                part = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:              # e4m3 -> x's dtype is exact (via float32)
                part = tl.dot(w.to(tl.float32).to(xt.dtype), xt)                # [BN, BM]
            if SCALE_K > 0:
                part = part * s[:, None]
            acc += part
    if BLOCK_M == 1:
        acc += tl.sum(acc2, axis=1)[:, None]
    if SCALE_K == 0:
        acc = acc * tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    out_mask = mask_n[:, None] & mask_m[None, :]
    if PARTIAL:     # partials [S, M, N] at out_ptr; FUSE: y [M, N] at y_ptr
        splitk_store(out_ptr, y_ptr, cnt_ptr, acc, offs_m[None, :] * N + offs_n[:, None], out_mask, pid_n, pid_s,
                     M * N, tl.num_programs(1), FUSE)
    else:
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def _bench(kernel_call, quantiles):
    """Short timing runs (25 ms a config, not Triton's 100): the kernel takes 5-150 us."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# cache_results: the chosen config is kept in Triton's cache directory, so a server restart (or
# the next benchmark process) skips the timing runs
_tuned = triton.autotune(CONFIGS, key=["BLOCK_M", "SCALE_K", "N", "K", "K_PER_SPLIT"], do_bench=_bench,
                         prune_configs_by={"early_config_prune": _prune}, cache_results=True)(_w8a16_kernel)


_tuned_keys: set[tuple] = set()   # shapes autotune has timed in this process


def plan_split(n: int, k: int) -> tuple[int, int]:
    """(split, k_per_split) from the shape alone: split K only where N < SPLIT_BELOW_N."""
    steps = triton.cdiv(k, SPLIT_K_STEP)
    want = 1 if n >= SPLIT_BELOW_N else min(MAX_SPLIT, steps, max(1, SPLIT_BELOW_N // max(n, 1)))
    per = triton.cdiv(steps, want)
    return triton.cdiv(steps, per), per * SPLIT_K_STEP


def _untimed_config(x: torch.Tensor, key: tuple) -> triton.Config | None:
    """The first fitting config where autotune must not time: CPU tensors (the interpreter) and
    a shape first seen inside a CUDA-graph capture (the runner's eager warm-up tunes before it,
    so this is a fallback); None: autotune."""
    if may_autotune(x, key, _tuned_keys):
        return None
    return next(c for c in CONFIGS if config_fits(c, key[0], key[1]))


def fp8_w8a16_gemv(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, scale_k: int = 0,
                   out_dtype: torch.dtype | None = None, config: triton.Config | None = None,
                   fuse_reduce: bool = True) -> torch.Tensor:
    """x [M, K] (M <= 16), w [N, K] e4m3, sw [N] (scale_k 0) or [N, ceil(K / scale_k)] block
    scales (scale_k a power of two >= 16) -> y [M, N] in out_dtype (x's dtype).
    ``config``: run this tile config instead of autotuning (tests); ``fuse_reduce=False``: sum
    a K split in a second launch (the same bits; tests, benchmarks)."""
    if scale_k and (scale_k < 16 or scale_k & (scale_k - 1)):
        raise ValueError(f"fp8_w8a16_gemv: scale_k {scale_k} must be a power of two >= 16")
    m, k = x.shape
    n = w.shape[0]
    kb = triton.cdiv(k, scale_k) if scale_k else 1
    if m > MAX_M or w.shape[1] != k or sw.numel() != n * kb:
        raise ValueError(f"fp8_w8a16_gemv: x {tuple(x.shape)}, w {tuple(w.shape)}, sw {tuple(sw.shape)} "
                         f"(M <= {MAX_M}, K and N must match, sw [N] or [N, ceil(K / {scale_k})])")
    x = x if x.stride(1) == 1 else x.contiguous()
    out_dtype = out_dtype or x.dtype
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=x.device)
    block_m = 1 if m == 1 else MAX_M
    split, k_per_split = plan_split(n, k)
    partial = split > 1
    y, out, cnt, fuse = split_buffers(m, n, split, out_dtype, x.device, fuse_reduce, MIN_BLOCK_N)
    args = (x, w, sw, out, y, cnt, m, n, k, k_per_split, x.stride(0), kb)
    # IEEE: float32 dot operands for float32 x, and in the interpreter (its bf16 dot is wrong)
    meta = dict(SCALE_K=scale_k, PARTIAL=partial, FUSE=fuse, BLOCK_M=block_m,
                IEEE=x.dtype == torch.float32 or not x.is_cuda)
    key = (block_m, scale_k, n, k, k_per_split, x.dtype, out_dtype)
    config = config or _untimed_config(x, key)
    if config is None:
        _tuned[lambda c: (triton.cdiv(n, c["BLOCK_N"]), split)](*args, **meta)
    else:
        _w8a16_kernel[(triton.cdiv(n, config.kwargs["BLOCK_N"]), split)](
            *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return splitk_reduce(out, out_dtype) if partial and not fuse else y
