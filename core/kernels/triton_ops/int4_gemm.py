"""Triton kernels for grouped int4 weights in the row-interleaved kernel layout.

Layout (what Int4LinearMethod stores; kvyard.layers.quantized_linear.int4_kernel_layout builds
it from the canonical layout of kvyard.layers.quant_math):
  qweight [N4, K/8, 4] int32   N4 = ceil(N / 4); word j of output n = 4 * r + i is
                               qweight[r, j, i], holding inputs 8j..8j+7 of that output in nibbles
                               0..7 (bits 4 * (k % 8)), unsigned 0..15. A 16-byte chunk is one word
                               of 4 consecutive outputs: they share the same 8 activations, so a
                               thread's vector load needs one 16-byte activation load beside it
                               (a plain [N, K/8] row needs four); consecutive chunks walk K.
                               Outputs past N (padding) are zero words.
  scales [G, N] (x's dtype family), zeros [G, N] uint8 (0..15), g_idx [K] int32: canonical.
y [M, N] = x [M, K] @ W^T with W[n, k] = (q[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n].
Both kernels read this one layout (no second copy for prefill).

Nibbles become floats without an int -> float conversion (a quarter-rate instruction): the
bits q | 0x4B000000 are the float32 2^23 + q, and subtracting 2^23 + z leaves q - z exactly;
the dequantized weight (q - z) * s is then exact in float32 (4-bit by <= 11-bit mantissas).
On CUDA the extraction is inline PTX (a shift and a lop3 per nibble). Numerics: float32
throughout; at M <= 4 the products of a word are summed before its scale multiplies them
((sum_k (q - z) x) * s instead of sum_k ((q - z) s) x): the same value up to float32 rounding.

The folded zero point (M <= FOLD_MAX_M = 2, sequential groups): the per-weight subtraction
goes. Nibble q moved to the top 4 mantissa bits (19..22) under the exponent of 16 is the float
v = 16 + q (bits 0x41800000 | q << 19: exact, 5 significant bits; the same trick as 1 + q/16
under 0x3F800000, scaled by 16 so no factor 16 is left over). For one word's 8 inputs, which
share the output's group (s, z):
    sum_i (q_i - z) x_i = sum_i v_i x_i - (16 + z) * X_w,    X_w = sum_i x_i,
so per weight: a shift and a lop3 (the plane) and one FMA of the chain t = sum_i v_i x_i
(before: the same plus one FADD, v - (2^23 + z)); per word and output: u = t - (16 + z) X_w
(one FMA), acc += u s (one FMA); per word and row: X_w (7 FADDs, shared by the chunk's 4
outputs). _scale_zero hands over 16 + z (one add, as 2^23 + z before). Error: float32 rounding
of terms of size < 32 sum_i |x_i| (v < 32): the chain's 8 roundings, X_w's 3 levels (of sums
< sum|x|) times 16 + z < 32, and u's one: < 400 * 2^-24 * s * sum_word |x| per word (2.4e-5
s sum|x|), i.e. < 6e-6 of sum_k |x_k| |w_k| where the mean |q - z| is >= 4 (measured ~6e-8
with float32 x, K 1024), far below the bf16 / fp16 output rounding (2^-8 / 2^-11 of |y|);
float32 x sees it as summation noise. From 3 rows the per-weight subtraction, computed once
and shared by the rows, costs fewer instructions than the fold's per-row X_w and u (sm_90 SASS
of the loop, M = 4: 350 vs 370 a tile; M = 1: 328 vs 354), so M 3..4 keep it.

Decode sizes (M <= GEMV_MAX_M) take ``_int4_mm_kernel``, autotuned per (M bucket, N, K, split,
group) on CUDA; the runner's eager warm-up of each captured batch size (CudaGraphCapture runs
the step eagerly before capture) runs the tuning outside the graph (a shape first seen inside
a capture takes the bucket's first fitting config, untimed). A program owns BLOCK_N
outputs and one K split, walked in BLOCK_K tiles of [BLOCK_N / 4, BLOCK_K / 8, 4] words,
unpacked by shifts and masks on whole words into [.., 8] nibbles. Per M bucket:
  M 1..4     CUDA cores, no padded tensor-core tile: per row, each word's 8 nibble planes
             minus the zero times the word's 8 activations in a chain of fused multiply-adds
             (M 1..2: the zero folded per word, above), times the word's scale (sequential
             groups; act-order scales per input), into a per-row accumulator of one value per
             output and word, summed over the words once at the end (no cross-thread
             reduction per tile);
  M 5..16    a 16-row dot (tf32 for bf16 / fp16 x: x exact in tf32, the weight rounded to
             tf32's 10-bit mantissa, as the tiled kernel; ieee for float32 x) on the dequantized
             tile (q - z) * s.
  DOT16      (any M <= 16, sequential groups, bf16 / fp16 x; configs with DOT16=True in every
             decode bucket, the autotuner picks them per shape on the device; _prune drops them
             for act-order, float32 x, a group that is not a whole number of K tiles or a split
             that is not: a K tile lies in one group, one scale row per tile). Each weight
             becomes (q - z) EXACTLY in x's 16-bit dtype: for a word w, byte j of w and of w >> 4
             (nibbles 2j, 2j + 1) prmt'd into the two 16-bit halves, lop3 (t & 0x000F000F) |
             MAGIC2 gives the two floats magic + q (MAGIC2 0x43004300: bf16 128, whose ulp is
             1; 0x64006400: fp16 1024), one packed sub.bf16x2 / sub.f16x2 of the pair (magic +
             z, magic + z) leaves (q - z) in -15..15 (inline PTX; the interpreter computes the
             same integers with Triton ops). The weight tile [BLOCK_N, BLOCK_K] is the A operand
             (registers) of a tensor-core dot with x^T [BLOCK_K, 16] (rows past M zero), float32
             accumulation, and acc += dot * s (the tile's scale row, float32): y^T per tile,
             transposed once at the end; K splits store the same float32 partials. Per weight:
             13/8 of prmt, lop3, sub and the shift a word (the halves feed the dot operand as
             they are); sm_90 SASS of the loop 2.6 instructions a weight at 256 x 128 tiles (the
             M 1 CUDA-core path: 5.1). Numerics: the products (q - z) x are exact in float32;
             each tile sums BLOCK_K of them in the tensor core's float32 (taken as truncating:
             BLOCK_K 2^-23 relative to the tile's sum |x| |q - z|), one rounding for the scale,
             K / BLOCK_K float32 tile sums: |y - ref| <= (BLOCK_K + K / BLOCK_K + 1) 2^-23
             sum_k |x_k| |w_nk| (K 4096, BLOCK_K 128: 1.9e-5 of sum |x||w|), under the bf16 /
             fp16 output rounding for any output not far below sum |x||w| / 100.
  WPT        (one row, sequential groups, the K tile inside one group: configs with WPT > 1 in
             bucket 1) each thread holds WPT words of every output it owns: the tile's words in
             WPT parts of W / WPT consecutive words, each part (and the activations, scale and
             zero) loaded in the one [R4, W / WPT, 4] layout, so a thread holds the same slot of
             every part; the folded chain runs on through the parts and the activation sum with
             it, so zero and scale apply once per WPT words; bf16 x is read as uint32 pairs (the
             low half shifted up, the high half masked: one instruction a value). PIPE (16-bit
             x, WPT 2 or 4): the next tile's loads are issued before this tile's arithmetic (the
             parts stacked in-thread with tl.join; the last iteration reloads the split's last
             tile rather than read past it). Numerics: those of the fold, the chain WPT words long.
  one-row plan (_one_row_plan: CUDA, 16-bit x, sequential groups of a multiple of 128) no
             autotuning: ONE_ROW_CONFIG (16 x 128, one warp, WPT 2, PIPE) at the split that
             makes ~ONE_ROW_PROGRAMS_PER_SM programs an SM (one_row_split), the fastest or within
             2% of it at every Llama-3.1-8B projection on the H100 with the weights past L2
             (benchmarks/int4_gemv_sweep.py); launched as a programmatic dependent (PDL): the
             first tile's weights, scale and zero are requested, then pdl_enter (common.py: the
             previous kernel complete, its writes visible; the next kernel may launch) before x
             is read or anything written.
K splits write float32 partials that the tile's last split program sums in a fixed order in
the same launch (kernels.triton_ops.splitk.splitk_store: one launch, deterministic; the
two-launch splitk_reduce where the counters do not fit or ``fuse_reduce=False``). Sequential
groups (g_idx == k // group, power-of-two group: every format without act-order) read one
scale / zero per output and group; otherwise (GPTQ act-order) they are gathered per input
through g_idx.

Larger M (prefill) runs the same kernel's dot path over 64-row M blocks (grid axis 2), K not
split, the tiling autotuned per (N, K, group) for all M > 16. ``int4_gemm_tiled`` keeps the
earlier tiled kernel (64 x 64 tiles, scales gathered per input through g_idx) for benchmark
comparison. Invariants: K % 8 == 0; results in x's dtype, float32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from kvyard.kernels.triton_ops.common import may_autotune, pdl_enter, pdl_launch, tile_offsets
from kvyard.kernels.triton_ops.splitk import (PROGRAMS_PER_SM, plan_split, sm_count, split_buffers, splitk_reduce,
                                               splitk_store)

GEMV_MAX_M = 16
SPLIT_BLOCK_K = 128        # K splits are multiples of this (configs with BLOCK_K dividing them run)
SPLIT_BLOCK_N = 32         # the row block the split plan assumes (the tuned BLOCK_N may differ)
MIN_K_PER_SPLIT = 3584     # the default split leaves each program at least this many inputs (_split_cap)
MAGIC = tl.constexpr(0x4B000000)   # float32 bits of 2^23: (MAGIC | q) is the float 2^23 + q
MAGIC_F = tl.constexpr(8388608.0)  # 2^23
ROWS = 4                  # outputs interleaved per 16-byte chunk of qweight
# up to this many rows the zero point is folded per word (module docstring); from 3 rows the
# per-weight subtraction, shared by the rows, costs fewer instructions than the per-row fold
FOLD_MAX_M = tl.constexpr(2)


def _cfg(bn: int, bk: int, warps: int, stages: int, dot16: bool = False, wpt: int = 1,
         pipe: bool = False) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "DOT16": dot16, "WPT": wpt, "PIPE": pipe},
                         num_warps=warps, num_stages=stages)


def _wide(bn: int, bk: int, warps: int, stages: int, wpt: int, pipe: bool = False) -> triton.Config:
    """A one-row tiling whose threads each hold ``wpt`` words of every output they own (the
    tile's K in ``wpt`` parts: module docstring, WPT); ``pipe``: the next tile's loads issued
    before this tile's arithmetic (WPT 2 or 4, 16-bit x)."""
    return _cfg(bn, bk, warps, stages, wpt=wpt, pipe=pipe)


def _dot16(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    """A DOT16 tiling (module docstring): after the bucket's CUDA-core / tf32 ones, so the
    untimed fallback (the bucket's first fitting config) never picks it."""
    return _cfg(bn, bk, warps, stages, dot16=True)


def DOT16_CONFIGS() -> list[triton.Config]:   # noqa: N802 (a table, one fresh copy per bucket)
    """The DOT16 tilings (the same in every M bucket: the dot pads M to 16). The weight tile is
    the dot's A operand ([BLOCK_N, BLOCK_K] from registers, Hopper's warpgroup MMA: BLOCK_N a
    multiple of 64 per 4 warps); wide BLOCK_N amortizes the per-tile x operand and loop costs
    (sm_90 SASS of the K loop: 2.6 instructions a weight at 256 x 128 / 4 warps, 4.4-4.5 at
    64-128 wide; benchmarks/int4_gemv_sass.py). BLOCK_K 64 serves group 64."""
    return [_dot16(256, 128, 4, 3), _dot16(512, 128, 8, 2), _dot16(128, 128, 8, 3), _dot16(64, 128, 4, 3),
            _dot16(256, 64, 4, 4), _dot16(512, 64, 8, 3)]


# per M bucket (BLOCK_M): a handful of tilings the H100 chooses among (each bucket keeps a
# BLOCK_K 128 tiling: it tiles any K split)
GEMV_CONFIGS = {
    1: [_cfg(16, 256, 4, 2), _cfg(32, 256, 4, 2), _cfg(32, 256, 8, 2), _cfg(64, 256, 8, 2),
        _cfg(32, 512, 8, 2), _cfg(16, 128, 4, 2),
        # deeper pipelines and longer K tiles: more weight bytes in flight per program
        _cfg(32, 512, 4, 3), _cfg(16, 512, 4, 3), _cfg(64, 512, 8, 3), _cfg(32, 1024, 8, 2),
        _cfg(128, 256, 8, 2),
        # each thread WPT words of its outputs (one-group tiles): zero and scale once per WPT words
        # (no DOT16 here: at one row it ran 2-4x slower than these on the H100, weights past L2)
        _wide(64, 128, 4, 2, 2), _wide(32, 128, 1, 2, 4), _wide(16, 128, 1, 2, 2), _wide(128, 64, 4, 2, 2),
        _wide(64, 128, 2, 2, 4, True), _wide(32, 128, 1, 2, 4, True), _wide(16, 128, 1, 2, 2, True),
        _wide(64, 64, 1, 2, 2, True)],
    2: [_cfg(16, 256, 4, 2), _cfg(32, 256, 4, 2), _cfg(32, 128, 4, 2), *DOT16_CONFIGS()],
    4: [_cfg(16, 256, 4, 2), _cfg(32, 256, 8, 2), _cfg(16, 128, 4, 2), *DOT16_CONFIGS()],
    16: [_cfg(32, 128, 4, 3), _cfg(64, 128, 4, 3), _cfg(16, 128, 4, 4), *DOT16_CONFIGS()],
    64: [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(64, 128, 8, 2)],     # M > 16: prefill tiles
}
ALL_CONFIGS = [c for cs in GEMV_CONFIGS.values() for c in cs]
# the one-row plan (_one_row_plan): one warp, 16 outputs, one 128-input group a tile, 2 words a
# thread, pipelined, at a K split that makes ~ONE_ROW_PROGRAMS_PER_SM programs an SM
ONE_ROW_CONFIG = next(c for c in GEMV_CONFIGS[1] if c.kwargs == {"BLOCK_N": 16, "BLOCK_K": 128, "DOT16": False,
                                                                  "WPT": 2, "PIPE": True})
ONE_ROW_PROGRAMS_PER_SM = 28
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in ALL_CONFIGS)


def m_bucket(m: int) -> int:
    """BLOCK_M for ``m`` token rows: 1, 2, 4 (CUDA-core paths), 16 (a dot, decode sizes) or
    64 (a dot over 64-row tiles, larger M)."""
    return triton.next_power_of_2(m) if m <= 4 else GEMV_MAX_M if m <= GEMV_MAX_M else 64


def config_fits(cfg: triton.Config, block_m: int, k: int, k_per_split: int) -> bool:
    """Whether ``cfg`` serves bucket ``block_m`` and tiles the split (a split shorter than K must
    be a whole number of BLOCK_K tiles)."""
    in_bucket = any(cfg is c for c in GEMV_CONFIGS[block_m])
    return in_bucket and (k_per_split >= k or k_per_split % cfg.kwargs["BLOCK_K"] == 0)


def path_fits(cfg: triton.Config, group: int, x_dtype: torch.dtype) -> bool:
    """Whether ``cfg``'s path applies to the weights and x: a DOT16 or WPT > 1 config needs
    sequential groups (the GROUP constexpr > 0) a whole number of its K tiles (one scale row per
    tile); DOT16 and PIPE also 16-bit x (the dot's operand dtype; activations read as uint32
    pairs); every other config applies to all."""
    if not (cfg.kwargs["DOT16"] or cfg.kwargs["WPT"] > 1):
        return True
    one_group = group > 0 and group % cfg.kwargs["BLOCK_K"] == 0
    sixteen_bit = x_dtype in (torch.bfloat16, torch.float16)
    return one_group and (sixteen_bit or not (cfg.kwargs["DOT16"] or cfg.kwargs["PIPE"]))


def _prune(configs, named_args, **kwargs):
    k, kps = named_args["K"], named_args["K_PER_SPLIT"]
    return [c for c in configs if config_fits(c, kwargs["BLOCK_M"], k, kps)
            and path_fits(c, kwargs["GROUP"], named_args["x_ptr"].dtype)]


TOP = tl.constexpr(0x41800000)      # float32 bits of 16: (TOP | q << 19) is the float 16 + q
TOP_MASK = tl.constexpr(0x00780000)  # the top 4 mantissa bits, 19..22
TOP_F = tl.constexpr(16.0)


def _plane_ptx(pos: int, base: int) -> str:
    """Inline PTX: nibble i of $8 (bits 4i..4i+3) moved to bits pos..pos+3 of $i over ``base``'s
    bits: one shift (none where the nibble is in place) and one lop3 ((t & mask) | base, lut
    0xEA) per nibble; an or where the shift leaves nothing but the nibble (the top nibble moved
    to bits 0..3)."""
    mask, lines = 0xF << pos, ["{", ".reg .b32 t;"]
    for i in range(8):
        d = pos - 4 * i
        shift = "" if d == 0 else f"shl.b32 t, $8, {d}; " if d > 0 else f"shr.b32 t, $8, {-d}; "
        src = "$8" if d == 0 else "t"
        alone = pos == 0 and i == 7
        lines.append(shift + (f"or.b32 ${i}, t, {base:#x};" if alone
                              else f"lop3.b32 ${i}, {src}, {mask:#x}, {base:#x}, 0xEA;"))
    return "\n".join(lines + ["}"])


# PTX of _planes on the GPU (2^23 + q: 7 shifts and 8 lop3 / or a word); the compiler's own
# lowering of the same expression spends a third instruction (a bit-field extract) per nibble,
# and the GEMV at M = 1 is bound by instruction issue near copy bandwidth
_PLANES_PTX = tl.constexpr(_plane_ptx(0, MAGIC.value))
# PTX of _top_planes (16 + q: nibble i shifted by 19 - 4i to the top mantissa bits; every
# nibble keeps other bits below it after its shift, so 8 shifts and 8 lop3 a word)
_TOP_PLANES_PTX = tl.constexpr(_plane_ptx(19, TOP.value))


MAGIC16 = {"bf16": 0x43004300, "fp16": 0x64006400}   # bf16 128 | fp16 1024, twice: (MAGIC16 | q) = 128 + q
NIBBLE_PAIR = 0x000F000F   # one nibble in the bottom of each 16-bit half


def _dot16_ptx(magic2: int, sub: str) -> str:
    """Inline PTX: word $8 and the packed pair (magic + z, magic + z) $9 -> (q_i - z) in 16-bit
    floats $0..$7 (nibble i at bits 4i..4i+3). v = $8 >> 4 puts nibble 2j + 1 at the bottom of
    byte j; per pair of nibbles 2j, 2j + 1 (consecutive inputs: the pair the tensor core's
    operand register holds, so no repacking): a prmt (byte j of $8 to bits 0..7, of v to bits
    16..23), a lop3 ((t & 0x000F000F) | magic2: the two floats magic + q), one packed
    subtraction (exact: both halves in [magic, magic + 15], their ulp 1) and a free register
    split: 13 instructions a word."""
    lines = ["{", ".reg .b32 v, t<4>;", "shr.b32 v, $8, 4;"]
    for j in range(4):
        sel = j | j << 4 | (4 + j) << 8 | (4 + j) << 12
        lines.append(f"prmt.b32 t{j}, $8, v, {sel:#x};")
        lines.append(f"lop3.b32 t{j}, t{j}, {NIBBLE_PAIR:#x}, {magic2:#x}, 0xEA;")
        lines.append(f"{sub} t{j}, t{j}, $9;")
        lines.append(f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, t{j};")
    return "\n".join(lines + ["}"])


_DOT16_BF16_PTX = tl.constexpr(_dot16_ptx(MAGIC16["bf16"], "sub.rn.bf16x2"))
_DOT16_FP16_PTX = tl.constexpr(_dot16_ptx(MAGIC16["fp16"], "sub.rn.f16x2"))
MAGIC16_BF16 = tl.constexpr(MAGIC16["bf16"])
MAGIC16_FP16 = tl.constexpr(MAGIC16["fp16"])
DOT_M = tl.constexpr(GEMV_MAX_M)     # the DOT16 path's rows: any M <= 16 padded to one 16-row dot


@triton.jit
def _as_floats(b0, b1, b2, b3, b4, b5, b6, b7):
    """8 uint32 planes -> the same bits as float32."""
    return (b0.to(tl.float32, bitcast=True), b1.to(tl.float32, bitcast=True), b2.to(tl.float32, bitcast=True),
            b3.to(tl.float32, bitcast=True), b4.to(tl.float32, bitcast=True), b5.to(tl.float32, bitcast=True),
            b6.to(tl.float32, bitcast=True), b7.to(tl.float32, bitcast=True))


@triton.jit
def _planes(words, ASM: tl.constexpr):
    """words int32 -> the 8 nibble planes, float32 2^23 + q (plane i: bits 4i..4i+3; logical
    shifts and masks on whole words, the words' own layout). ASM: the same in inline PTX
    (CUDA only; the interpreter runs the Triton expression)."""
    u = words.to(tl.uint32, bitcast=True)
    if ASM:
        b0, b1, b2, b3, b4, b5, b6, b7 = tl.inline_asm_elementwise(
            _PLANES_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [u], dtype=(tl.uint32,) * 8, is_pure=True, pack=1)
    else:
        b0 = (u & 0xF) | MAGIC
        b1 = ((u >> 4) & 0xF) | MAGIC
        b2 = ((u >> 8) & 0xF) | MAGIC
        b3 = ((u >> 12) & 0xF) | MAGIC
        b4 = ((u >> 16) & 0xF) | MAGIC
        b5 = ((u >> 20) & 0xF) | MAGIC
        b6 = ((u >> 24) & 0xF) | MAGIC
        b7 = (u >> 28) | MAGIC
    return _as_floats(b0, b1, b2, b3, b4, b5, b6, b7)


@triton.jit
def _top_planes(words, ASM: tl.constexpr):
    """words int32 -> the 8 nibble planes as float32 16 + q: q in the top 4 mantissa bits
    (exact, 5 significant bits; module docstring). ASM: inline PTX, as _planes."""
    u = words.to(tl.uint32, bitcast=True)
    if ASM:
        b0, b1, b2, b3, b4, b5, b6, b7 = tl.inline_asm_elementwise(
            _TOP_PLANES_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [u], dtype=(tl.uint32,) * 8, is_pure=True, pack=1)
    else:
        b0 = ((u << 19) & TOP_MASK) | TOP
        b1 = ((u << 15) & TOP_MASK) | TOP
        b2 = ((u << 11) & TOP_MASK) | TOP
        b3 = ((u << 7) & TOP_MASK) | TOP
        b4 = ((u << 3) & TOP_MASK) | TOP
        b5 = ((u >> 1) & TOP_MASK) | TOP
        b6 = ((u >> 5) & TOP_MASK) | TOP
        b7 = ((u >> 9) & TOP_MASK) | TOP
    return _as_floats(b0, b1, b2, b3, b4, b5, b6, b7)


@triton.jit
def _join8(p0, p1, p2, p3, p4, p5, p6, p7):
    """8 planes [...] -> [..., 8] with plane i at [..., i]: the joins add the axis inside each
    thread (no data movement), highest index bit first so the flat order is 4a + 2b + c."""
    a0, a1, a2, a3 = tl.join(p0, p4), tl.join(p1, p5), tl.join(p2, p6), tl.join(p3, p7)   # [.., a]
    b0, b1 = tl.join(a0, a2), tl.join(a1, a3)                                             # [.., a, b]
    q = tl.join(b0, b1)                                                                   # [.., a, b, c]
    return tl.reshape(q, (p0.shape[0], p0.shape[1], p0.shape[2], 8))


@triton.jit
def _split8(x):
    """[R4, W, 8] -> its 8 planes [R4, W] (the inverse of _join8 on one fewer axis)."""
    q = tl.reshape(x, (x.shape[0], x.shape[1], 2, 2, 2))             # [.., a, b, c]
    c0, c1 = tl.split(q)                                             # [.., a, b]
    b00, b01 = tl.split(c0)                                          # [.., a] with c = 0
    b10, b11 = tl.split(c1)                                          # c = 1
    x0, x4 = tl.split(b00)
    x2, x6 = tl.split(b01)
    x1, x5 = tl.split(b10)
    x3, x7 = tl.split(b11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _nibbles(words, ASM: tl.constexpr):
    """words [R4, W, 4] int32 -> [R4, W, 4, 8] float32 2^23 + q, nibble i of a word at [..., i]."""
    p0, p1, p2, p3, p4, p5, p6, p7 = _planes(words, ASM)
    return _join8(p0, p1, p2, p3, p4, p5, p6, p7)


@triton.jit
def _scale_zero(s_ptr, z_ptr, g_ptr, offs_n, mask_n, N, k0, k_hi, kin,
                GROUP: tl.constexpr, BLOCK_K: tl.constexpr, FOLD: tl.constexpr):
    """(s, 2^23 + z) float32 for the tile of outputs offs_n [R4, 4] and inputs kin [W, 8]:
    [R4, 1, 4] (the tile in one group), [R4, W, 4] (one group per word: the 8 nibbles of a word
    share one) or [R4, W, 4, 8] (gathered per input through g_idx: act-order). FOLD (M <=
    FOLD_MAX_M) with sequential groups: (s, 16 + z), the offset of _top_planes (the same one add)."""
    if GROUP >= BLOCK_K:
        ptr = (k0 // GROUP) * N + offs_n[:, None, :]
        gm = mask_n[:, None, :]
    elif GROUP > 0:
        gw = (k0 + tl.arange(0, BLOCK_K // 8) * 8) // GROUP
        ptr = gw[None, :, None] * N + offs_n[:, None, :]
        gm = mask_n[:, None, :] & (gw[None, :, None] * GROUP < k_hi)
    else:
        km = kin < k_hi
        g = tl.load(g_ptr + kin, mask=km, other=0)
        ptr = g[None, :, None, :] * N + offs_n[:, None, :, None]
        gm = mask_n[:, None, :, None] & km[None, :, None, :]
    s = tl.load(s_ptr + ptr, mask=gm, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + ptr, mask=gm, other=0).to(tl.float32)
    if FOLD and GROUP > 0:
        return s, z + TOP_F
    else:
        return s, z + MAGIC_F


@triton.jit
def _dequant(words, s, z, GROUP: tl.constexpr, ASM: tl.constexpr):
    """The tile's weights (q - z) * s, float32 [R4, W, 4, 8] (exact: small integer times s)."""
    if GROUP > 0:
        return (_nibbles(words, ASM) - z[:, :, :, None]) * s[:, :, :, None]
    else:
        return (_nibbles(words, ASM) - z) * s


@triton.jit
def _dot16_weights(words, zz, DT: tl.constexpr, ASM: tl.constexpr):
    """words [R4, W, 4] int32 and zz (the packed 16-bit pair magic + z per word, uint32, same
    shape) -> (q - z) [R4, W, 4, 8] in DT (bf16 / fp16: integers -15..15, exact), nibble i of a
    word at [..., i]. ASM: the inline PTX of _dot16_ptx; otherwise (the interpreter) integer
    ops and one conversion, the same values."""
    u = words.to(tl.uint32, bitcast=True)
    if ASM:
        if DT == tl.bfloat16:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _DOT16_BF16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [u, zz], dtype=(tl.bfloat16,) * 8, is_pure=True,
                pack=1)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _DOT16_FP16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [u, zz], dtype=(tl.float16,) * 8, is_pure=True,
                pack=1)
    else:
        z = (zz & 0xF).to(tl.int32)
        v0 = ((u & 0xF).to(tl.int32) - z).to(DT)
        v1 = (((u >> 4) & 0xF).to(tl.int32) - z).to(DT)
        v2 = (((u >> 8) & 0xF).to(tl.int32) - z).to(DT)
        v3 = (((u >> 12) & 0xF).to(tl.int32) - z).to(DT)
        v4 = (((u >> 16) & 0xF).to(tl.int32) - z).to(DT)
        v5 = (((u >> 20) & 0xF).to(tl.int32) - z).to(DT)
        v6 = (((u >> 24) & 0xF).to(tl.int32) - z).to(DT)
        v7 = ((u >> 28).to(tl.int32) - z).to(DT)
    return _join8(v0, v1, v2, v3, v4, v5, v6, v7)


@triton.jit
def _dot16_scale_zero(s_ptr, z_ptr, offs_n, mask_n, N, k0, W: tl.constexpr, DT: tl.constexpr,
                      GROUP: tl.constexpr):
    """The tile's group (GROUP a multiple of BLOCK_K: one row): s [R4 * 4] float32 (output
    4 * r + i) and the packed pair magic + z, uint32 [R4, W, 4] (broadcast over the words)."""
    ptr = (k0 // GROUP) * N + offs_n[:, None, :]                     # [R4, 1, 4]
    s = tl.load(s_ptr + ptr, mask=mask_n[:, None, :], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + ptr, mask=mask_n[:, None, :], other=0).to(tl.uint32)
    magic: tl.constexpr = MAGIC16_BF16 if DT == tl.bfloat16 else MAGIC16_FP16
    zz = (z * 0x10001) | magic
    return tl.reshape(s, (s.shape[0] * 4,)), tl.broadcast_to(zz, (zz.shape[0], W, 4))


@triton.jit
def _fma_chain(p0, p1, p2, p3, p4, p5, p6, p7, x0, x1, x2, x3, x4, x5, x6, x7, t=None):
    """t + sum_i p_i x_i over a word's 8 planes [R4, W, 4] and activations [R4, W] (t None: 0):
    8 fused multiply-adds in input order (one multiply and 7 without t)."""
    if t is None:
        t = p0 * x0[:, :, None]
    else:
        t += p0 * x0[:, :, None]
    t += p1 * x1[:, :, None]
    t += p2 * x2[:, :, None]
    t += p3 * x3[:, :, None]
    t += p4 * x4[:, :, None]
    t += p5 * x5[:, :, None]
    t += p6 * x6[:, :, None]
    t += p7 * x7[:, :, None]
    return t


@triton.jit
def _row_product(words, s, z, x_row_ptr, xin, k_row, GROUP: tl.constexpr, FOLD: tl.constexpr,
                 ASM: tl.constexpr):
    """The tile times one activation row (x at x_row_ptr + xin, [R4, W, 8]; ``k_row`` 0 for
    rows past M: they read nothing) -> [R4, W, 4], one value per output and word. Sequential
    groups, FOLD (z = 16 + zero, _scale_zero's FOLD): the folded sum of the module docstring,
    the chain on the planes 16 + q minus z times the word's activation sum (one per word, shared
    by the chunk's 4 outputs), times the word's scale; without FOLD (z = 2^23 + zero): the
    chain on the planes minus z (one subtraction per weight, shared by the rows), times the
    scale; act-order: dequantized and scaled per input."""
    x = tl.load(x_row_ptr + xin, mask=xin < k_row, other=0.0).to(tl.float32)
    if GROUP > 0:
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x)
        if FOLD:
            p0, p1, p2, p3, p4, p5, p6, p7 = _top_planes(words, ASM)
            t = _fma_chain(p0, p1, p2, p3, p4, p5, p6, p7, x0, x1, x2, x3, x4, x5, x6, x7)
            x_word = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))     # [R4, W]
            return (t - z * x_word[:, :, None]) * s
        else:
            p0, p1, p2, p3, p4, p5, p6, p7 = _planes(words, ASM)
            return _fma_chain(p0 - z, p1 - z, p2 - z, p3 - z, p4 - z, p5 - z, p6 - z, p7 - z,
                              x0, x1, x2, x3, x4, x5, x6, x7) * s
    else:
        return tl.sum(_dequant(words, s, z, GROUP, ASM) * x[:, :, None, :], axis=3)


@triton.jit
def _split4(x):
    """[R4, W, 4] -> its 4 planes [R4, W] (element i of the last axis is plane i)."""
    q = tl.reshape(x, (x.shape[0], x.shape[1], 2, 2))
    c0, c1 = tl.split(q)
    e0, e2 = tl.split(c0)
    e1, e3 = tl.split(c1)
    return e0, e1, e2, e3


@triton.jit
def _word_activations(x_ptr, jw, k_hi, R4: tl.constexpr, EVEN: tl.constexpr):
    """The 8 activations of words jw [WP] as float32 planes [R4, WP] (the layout of a [R4, WP, 4]
    word load: each thread its own copy). bf16 x: loaded as 4 uint32 pairs, input 2i the low
    half shifted up, 2i + 1 the high half masked (one instruction each); otherwise converted."""
    if x_ptr.dtype.element_ty == tl.bfloat16:
        return _pair_planes(_part_pairs(x_ptr.to(tl.pointer_type(tl.uint32), bitcast=True), jw, k_hi, R4, EVEN),
                            True)
    else:
        xin = tl.broadcast_to((jw[:, None] * 8 + tl.arange(0, 8)[None, :])[None, :, :], (R4, jw.shape[0], 8))
        if EVEN:
            x = tl.load(x_ptr + xin).to(tl.float32)
        else:
            x = tl.load(x_ptr + xin, mask=xin < k_hi, other=0.0).to(tl.float32)
        return _split8(x)


@triton.jit
def _wide_product(chunk_ptr, x_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, j0, k_hi, GROUP: tl.constexpr,
                  W: tl.constexpr, WPT: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr):
    """One K tile of the one-row WPT path (sequential groups, the tile inside one group): the
    tile's words in WPT parts of W / WPT consecutive words (part p: words p W / WPT + j), every
    load (words, activations, the tile's scale and zero, broadcast over the words) of the one
    shape [R4, W / WPT, 4], so a thread holds the same position of every part and no load needs
    a layout exchange; the folded chain (16 + q planes) runs on through a thread's parts and
    the activation sum with it, so zero and scale apply once per WPT words -> [R4, W / WPT, 4]."""
    WP: tl.constexpr = W // WPT
    R4: tl.constexpr = offs_n.shape[0]
    kw = tl.arange(0, WP)
    s, z = _wide_scale_zero(s_ptr, z_ptr, offs_n, mask_n, N, j0, GROUP, WP)
    t = tl.zeros((R4, WP, 4), dtype=tl.float32)
    x_sum = tl.zeros((R4, WP), dtype=tl.float32)
    for part in tl.static_range(WPT):
        jw = j0 + part * WP + kw                                             # [WP] words
        x0, x1, x2, x3, x4, x5, x6, x7 = _word_activations(x_ptr, jw, k_hi, R4, EVEN)
        t, x_sum = _chain_on(_part_words(chunk_ptr, rg, N, jw, k_hi, R4, EVEN), x0, x1, x2, x3, x4, x5, x6, x7,
                             t, x_sum, ASM)
    return (t - (z.to(tl.float32) + TOP_F) * x_sum[:, :, None]) * s.to(tl.float32)


@triton.jit
def _wide_scale_zero(s_ptr, z_ptr, offs_n, mask_n, N, j0, GROUP: tl.constexpr, WP: tl.constexpr):
    """The scale and zero of a WPT tile (inside one group) as loaded, broadcast over its WP
    word slots: [R4, WP, 4], the words' layout (each thread its own copy)."""
    kw = tl.arange(0, WP)
    sz = (j0 * 8 // GROUP) * N + offs_n[:, None, :] + 0 * kw[None, :, None]
    sm = mask_n[:, None, :] & (kw >= 0)[None, :, None]
    return tl.load(s_ptr + sz, mask=sm, other=0.0), tl.load(z_ptr + sz, mask=sm, other=0)


@triton.jit
def _chain_on(words, x0, x1, x2, x3, x4, x5, x6, x7, t, x_sum, ASM: tl.constexpr):
    """One part of a WPT tile: the folded chain t (16 + q planes times the activations) and the
    activation sum x_sum carried on through the part's words [R4, WP, 4]."""
    p0, p1, p2, p3, p4, p5, p6, p7 = _top_planes(words, ASM)
    t = _fma_chain(p0, p1, p2, p3, p4, p5, p6, p7, x0, x1, x2, x3, x4, x5, x6, x7, t)
    return t, x_sum + (((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)))


@triton.jit
def _pair_floats(e):
    """uint32 words of two bf16 activations -> (input 2i, input 2i + 1) as float32: the low half
    shifted up, the high half masked (one instruction each; _pair_floats_fp16 for fp16)."""
    return (e << 16).to(tl.float32, bitcast=True), (e & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _pair_floats_fp16(e):
    lo = (e & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (e >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pair_planes(pairs, BF16: tl.constexpr):
    """Activation pairs [R4, WP, 4] uint32 (a word's 8 inputs) -> its 8 float32 planes [R4, WP]."""
    e0, e1, e2, e3 = _split4(pairs)
    if BF16:
        x0, x1 = _pair_floats(e0)
        x2, x3 = _pair_floats(e1)
        x4, x5 = _pair_floats(e2)
        x6, x7 = _pair_floats(e3)
    else:
        x0, x1 = _pair_floats_fp16(e0)
        x2, x3 = _pair_floats_fp16(e1)
        x4, x5 = _pair_floats_fp16(e2)
        x6, x7 = _pair_floats_fp16(e3)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _part_chain(words, pairs, t, x_sum, BF16: tl.constexpr, ASM: tl.constexpr):
    """One part [R4, WP, 4] of the pipelined WPT path: words and the activation pairs of the
    same layout -> the folded chain t and the activation sum x_sum carried on."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _pair_planes(pairs, BF16)
    return _chain_on(words, x0, x1, x2, x3, x4, x5, x6, x7, t, x_sum, ASM)


@triton.jit
def _part_words(chunk_ptr, rg, N, jw, k_hi, R4: tl.constexpr, EVEN: tl.constexpr):
    """Words jw [WP] of the tile's outputs, [R4, WP, 4]."""
    wptr = chunk_ptr + (jw * 4)[None, :, None]
    if EVEN:
        return tl.load(wptr)
    else:
        return tl.load(wptr, mask=(rg * 4 < N)[:, None, None] & (jw * 8 < k_hi)[None, :, None], other=0)


@triton.jit
def _part_pairs(xw_ptr, jw, k_hi, R4: tl.constexpr, EVEN: tl.constexpr):
    """The activations of words jw [WP] as uint32 pairs, [R4, WP, 4] (the words' layout)."""
    pin = tl.broadcast_to((jw[:, None] * 4 + tl.arange(0, 4)[None, :])[None, :, :], (R4, jw.shape[0], 4))
    if EVEN:
        return tl.load(xw_ptr + pin)
    else:
        return tl.load(xw_ptr + pin, mask=pin * 2 < k_hi, other=0)


@triton.jit
def _stack(p0, p1, p2, p3, WPT: tl.constexpr):
    """WPT (2 or 4) parts [R4, WP, 4] stacked on a last axis (tl.join: inside each thread)."""
    if WPT == 2:
        return tl.join(p0, p1)
    else:
        return tl.join(tl.join(p0, p2), tl.join(p1, p3))


@triton.jit
def _tile_weights(chunk_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, j0, k_hi, GROUP: tl.constexpr,
                  WP: tl.constexpr, WPT: tl.constexpr, EVEN: tl.constexpr):
    """The weight loads of one tile of the pipelined WPT path (WPT 2 or 4): the words, parts
    stacked, and the tile's scale and zero, all in the [R4, WP, 4] layout."""
    R4: tl.constexpr = offs_n.shape[0]
    kw = tl.arange(0, WP)
    s, z = _wide_scale_zero(s_ptr, z_ptr, offs_n, mask_n, N, j0, GROUP, WP)
    w0 = _part_words(chunk_ptr, rg, N, j0 + kw, k_hi, R4, EVEN)
    w1 = _part_words(chunk_ptr, rg, N, j0 + WP + kw, k_hi, R4, EVEN)
    if WPT == 2:
        words = _stack(w0, w1, w0, w1, WPT)
    else:
        w2 = _part_words(chunk_ptr, rg, N, j0 + 2 * WP + kw, k_hi, R4, EVEN)
        w3 = _part_words(chunk_ptr, rg, N, j0 + 3 * WP + kw, k_hi, R4, EVEN)
        words = _stack(w0, w1, w2, w3, WPT)
    return words, s, z


@triton.jit
def _tile_pairs(xw_ptr, j0, k_hi, R4: tl.constexpr, WP: tl.constexpr, WPT: tl.constexpr, EVEN: tl.constexpr):
    """The activation loads of one tile (uint32 pairs, parts stacked as _tile_weights')."""
    kw = tl.arange(0, WP)
    x0 = _part_pairs(xw_ptr, j0 + kw, k_hi, R4, EVEN)
    x1 = _part_pairs(xw_ptr, j0 + WP + kw, k_hi, R4, EVEN)
    if WPT == 2:
        pairs = _stack(x0, x1, x0, x1, WPT)
    else:
        x2 = _part_pairs(xw_ptr, j0 + 2 * WP + kw, k_hi, R4, EVEN)
        x3 = _part_pairs(xw_ptr, j0 + 3 * WP + kw, k_hi, R4, EVEN)
        pairs = _stack(x0, x1, x2, x3, WPT)
    return pairs


@triton.jit
def _tile_product(words, pairs, s, z, WPT: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """One tile of the pipelined WPT path from its stacked loads -> [R4, WP, 4] (the folded
    sum of every part, zero and scale applied once)."""
    t = tl.zeros(s.shape, dtype=tl.float32)
    x_sum = tl.zeros((s.shape[0], s.shape[1]), dtype=tl.float32)
    if WPT == 2:
        w0, w1 = tl.split(words)
        x0, x1 = tl.split(pairs)
        t, x_sum = _part_chain(w0, x0, t, x_sum, BF16, ASM)
        t, x_sum = _part_chain(w1, x1, t, x_sum, BF16, ASM)
    else:
        wa, wb = tl.split(words)
        xa, xb = tl.split(pairs)
        w0, w2 = tl.split(wa)
        w1, w3 = tl.split(wb)
        x0, x2 = tl.split(xa)
        x1, x3 = tl.split(xb)
        t, x_sum = _part_chain(w0, x0, t, x_sum, BF16, ASM)
        t, x_sum = _part_chain(w1, x1, t, x_sum, BF16, ASM)
        t, x_sum = _part_chain(w2, x2, t, x_sum, BF16, ASM)
        t, x_sum = _part_chain(w3, x3, t, x_sum, BF16, ASM)
    return (t - (z.to(tl.float32) + TOP_F) * x_sum[:, :, None]) * s.to(tl.float32)


@triton.jit
def _wide_pipelined(chunk_ptr, x_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, j_lo, j_hi, k_hi,
                    GROUP: tl.constexpr, W: tl.constexpr, WPT: tl.constexpr, EVEN: tl.constexpr,
                    ASM: tl.constexpr, PDL: tl.constexpr):
    """The WPT path's K loop with the next tile's loads issued before this tile's arithmetic
    (one tile of words, activations, scale and zero in flight beside the one in use; the last
    iteration reloads the split's last tile instead of reading past it) -> [R4, W / WPT, 4].
    PDL (launched as a programmatic dependent of the kernel before it): the first tile's
    weights are requested before waiting for that kernel (pdl_enter: its writes, x among them,
    visible), so they stream while it drains; nothing is read from or written for it before."""
    R4: tl.constexpr = offs_n.shape[0]
    WP: tl.constexpr = W // WPT
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    xw_ptr = x_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
    last = tl.maximum(j_hi - W, j_lo)
    words, s, z = _tile_weights(chunk_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, j_lo, k_hi, GROUP, WP, WPT, EVEN)
    pdl_enter(PDL)
    pairs = _tile_pairs(xw_ptr, j_lo, k_hi, R4, WP, WPT, EVEN)
    acc = tl.zeros((R4, WP, 4), dtype=tl.float32)
    for j0 in range(j_lo, j_hi, W):
        nxt = tl.minimum(j0 + W, last)
        words_n, s_n, z_n = _tile_weights(chunk_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, nxt, k_hi, GROUP, WP, WPT,
                                          EVEN)
        pairs_n = _tile_pairs(xw_ptr, nxt, k_hi, R4, WP, WPT, EVEN)
        acc += _tile_product(words, pairs, s, z, WPT, BF16, ASM)
        words, pairs, s, z = words_n, pairs_n, s_n, z_n
    return acc


@triton.jit
def _row_total(acc, BLOCK_N: tl.constexpr):
    """[R4, W, 4] -> [BLOCK_N] (output 4 * r + i), summed over the tile's words."""
    return tl.reshape(tl.sum(acc, axis=1), (BLOCK_N,))


@triton.jit
def _dot16_tile(words, x_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, N, stride_xm, k0, k_hi,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """One K tile of the DOT16 path -> [DOT_M, BLOCK_N] float32: x [16, BLOCK_K] (x's dtype,
    rows past M zero) @ (q - z) [BLOCK_K, BLOCK_N] (exact in x's dtype) on the tensor cores with
    float32 accumulation, times the tile's scale row."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    s, zz = _dot16_scale_zero(s_ptr, z_ptr, offs_n, mask_n, N, k0, BLOCK_K // 8, DT, GROUP)
    w = _dot16_weights(words, zz, DT, ASM)                                            # [R4, W, 4, 8]
    wnk = tl.reshape(tl.permute(w, (0, 2, 1, 3)), (BLOCK_N, BLOCK_K))                  # [BN, BK]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                 mask=mask_m[None, :] & (offs_k[:, None] < k_hi), other=0.0)            # [BK, 16]
    return tl.dot(wnk, xt, out_dtype=tl.float32) * s[:, None]


@triton.jit
def _int4_mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, y_ptr, cnt_ptr, M, N, K, K_PER_SPLIT, stride_xm,
                      K8, W_PER_SPLIT, GROUP: tl.constexpr, PARTIAL: tl.constexpr, FUSE: tl.constexpr,
                      FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN: tl.constexpr, ASM: tl.constexpr, DOT16: tl.constexpr, WPT: tl.constexpr,
                      PIPE: tl.constexpr, PDL: tl.constexpr = False):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    R4: tl.constexpr = BLOCK_N // 4
    W: tl.constexpr = BLOCK_K // 8
    FOLD: tl.constexpr = BLOCK_M <= FOLD_MAX_M                   # the folded zero point
    if DOT16:       # one 16-row dot tile whatever the bucket (grid axis 2: one block at M <= 16)
        offs_m = tl.arange(0, DOT_M)
    else:
        offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)     # one M block below 64 rows
    mask_m = offs_m < M
    rg = pid_n * R4 + tl.arange(0, R4)                               # row groups of 4 outputs
    offs_n = rg[:, None] * 4 + tl.arange(0, 4)[None, :]              # [R4, 4]
    mask_n = offs_n < N
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)                         # a multiple of 8
    kw = tl.arange(0, W)                                             # word of the tile
    kt = kw[:, None] * 8 + tl.arange(0, 8)[None, :]                  # [W, 8] input of the tile
    # [R4, 1, 4] chunk pointers; K8 = K / 8 passed apart: its own divisibility (16-byte chunks)
    chunk_ptr = qw_ptr + (rg[:, None, None] * K8) * 4 + tl.arange(0, 4)[None, None, :]
    if DOT16:
        acc = tl.zeros((BLOCK_N, DOT_M), dtype=tl.float32)     # y^T: the weight tile is the dot's A
    elif WPT > 1:             # one row (_prune): a value per output and word slot of a part
        acc0 = tl.zeros((R4, W // WPT, 4), dtype=tl.float32)
    elif BLOCK_M <= 4:        # one accumulator per row (unused ones are dead code)
        acc0 = tl.zeros((R4, W, 4), dtype=tl.float32)
        acc1 = tl.zeros((R4, W, 4), dtype=tl.float32)
        acc2 = tl.zeros((R4, W, 4), dtype=tl.float32)
        acc3 = tl.zeros((R4, W, 4), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    j_end = tl.minimum(pid_s * W_PER_SPLIT + W_PER_SPLIT, K8)
    if PIPE:    # the pipelined WPT path: its own loop (one row, 16-bit x: _prune); the one below is empty
        acc0 = _wide_pipelined(chunk_ptr, x_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, pid_s * W_PER_SPLIT, j_end,
                               k_hi, GROUP, W, WPT, EVEN, ASM, PDL)
        j_end = pid_s * W_PER_SPLIT
    # walk words, not inputs: j0's divisibility (that of W_PER_SPLIT) is the loads' alignment
    for j0 in range(pid_s * W_PER_SPLIT, j_end, W):
        k0 = j0 * 8
        kin = k0 + kt
        if WPT == 1:    # (the WPT path loads its parts itself)
            wptr = chunk_ptr + ((j0 + kw) * 4)[None, :, None]
            if EVEN:
                words = tl.load(wptr)
            else:
                wm = (rg * 4 < N)[:, None, None] & (k0 + kw * 8 < k_hi)[None, :, None]
                words = tl.load(wptr, mask=wm, other=0)
        if WPT > 1:
            acc0 += _wide_product(chunk_ptr, x_ptr, s_ptr, z_ptr, offs_n, mask_n, rg, N, j0, k_hi, GROUP, W, WPT,
                                  EVEN, ASM)
        elif DOT16:
            acc += _dot16_tile(words, x_ptr, s_ptr, z_ptr, offs_m, mask_m, offs_n, mask_n, N, stride_xm, k0,
                               k_hi, GROUP, BLOCK_N, BLOCK_K, ASM)
        elif BLOCK_M <= 4:
            s, z = _scale_zero(s_ptr, z_ptr, g_ptr, offs_n, mask_n, N, k0, k_hi, kin, GROUP, BLOCK_K, FOLD)
            # x loaded as [R4, W, 8] (each warp its own copy, L1 hits): the layout of the
            # weight tile's threads, so no shared-memory exchange per tile
            xin = tl.broadcast_to(kin[None, :, :], (R4, W, 8))
            acc0 += _row_product(words, s, z, x_ptr, xin, k_hi, GROUP, FOLD, ASM)
            if BLOCK_M > 1:
                acc1 += _row_product(words, s, z, x_ptr + stride_xm, xin, tl.where(M > 1, k_hi, 0), GROUP, FOLD,
                                     ASM)
            if BLOCK_M > 2:
                acc2 += _row_product(words, s, z, x_ptr + 2 * stride_xm, xin, tl.where(M > 2, k_hi, 0), GROUP,
                                     FOLD, ASM)
                acc3 += _row_product(words, s, z, x_ptr + 3 * stride_xm, xin, tl.where(M > 3, k_hi, 0), GROUP,
                                     FOLD, ASM)
        else:
            s, z = _scale_zero(s_ptr, z_ptr, g_ptr, offs_n, mask_n, N, k0, k_hi, kin, GROUP, BLOCK_K, FOLD)
            w = _dequant(words, s, z, GROUP, ASM)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < k_hi), other=0.0).to(tl.float32)
            wt = tl.trans(tl.reshape(tl.permute(w, (0, 2, 1, 3)), (BLOCK_N, BLOCK_K)))   # [BK, BN]
            if FP32:
                acc += tl.dot(x, wt, input_precision="ieee")
            else:
                acc += tl.dot(x, wt, input_precision="tf32")
    if DOT16:
        res = tl.trans(acc)
    elif BLOCK_M <= 4:      # (the WPT path: BLOCK_M 1)
        res = tl.where(offs_m[:, None] == 0, _row_total(acc0, BLOCK_N)[None, :], 0.0)
        if BLOCK_M > 1:
            res += tl.where(offs_m[:, None] == 1, _row_total(acc1, BLOCK_N)[None, :], 0.0)
        if BLOCK_M > 2:
            res += tl.where(offs_m[:, None] == 2, _row_total(acc2, BLOCK_N)[None, :], 0.0)
            res += tl.where(offs_m[:, None] == 3, _row_total(acc3, BLOCK_N)[None, :], 0.0)
    else:
        res = acc
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = mask_m[:, None] & (cols < N)[None, :]
    if PARTIAL:     # partials [S, M, N] at out_ptr (one M block: M <= BLOCK_M); FUSE: y [M, N] at y_ptr
        splitk_store(out_ptr, y_ptr, cnt_ptr, res, offs_m[:, None] * N + cols[None, :], out_mask, pid_n, pid_s,
                     M * N, tl.num_programs(1), FUSE)
    else:
        tl.store(out_ptr + offs_m[:, None] * N + cols[None, :], res.to(out_ptr.dtype.element_ty), mask=out_mask)


_MM_HEURISTICS = {
    "EVEN": lambda a: a["N"] % a["BLOCK_N"] == 0 and a["K"] % a["BLOCK_K"] == 0
    and (a["K_PER_SPLIT"] >= a["K"] or a["K_PER_SPLIT"] % a["BLOCK_K"] == 0),
}
_mm_fixed = triton.heuristics(_MM_HEURISTICS)(_int4_mm_kernel)     # explicit config (interpreter, tests)


def _quick_bench(fn, quantiles):
    """Autotuning runs in the model runner's warm-up of every captured batch size: a short
    timing (a GEMV is tens of microseconds) keeps start-up short."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# cache_results: the chosen config is kept in Triton's cache directory (a restart skips timing)
_mm_tuned = triton.autotune(ALL_CONFIGS, key=["N", "K", "K_PER_SPLIT", "BLOCK_M", "GROUP"],
                            prune_configs_by={"early_config_prune": _prune},
                            do_bench=_quick_bench, cache_results=True)(_mm_fixed)
_tuned_keys: set[tuple] = set()   # shapes autotune has timed in this process


def _sequential_group(group_size: int) -> int:
    """The GROUP constexpr: a power-of-two group >= 8 is read by row; anything else gathers."""
    return group_size if group_size >= 8 and group_size & (group_size - 1) == 0 else 0


def _split_cap(k: int, n: int, sms: int) -> int:
    """The default K split: enough programs for the SMs (splitk.plan_split's count), but every
    split at least MIN_K_PER_SPLIT inputs long. Measured on the H100 at one row (graph replays):
    4096 x 6144 7.8 us unsplit vs 8.7 at split 2; 4096 x 4096 6.6 vs 6.8 at 4; 14336 x 4096
    wants its 4 splits (16.0 us vs 17.3 unsplit)."""
    want = max(1, (PROGRAMS_PER_SM * sms) // triton.cdiv(n, SPLIT_BLOCK_N))
    return max(1, min(want, k // MIN_K_PER_SPLIT))


def _one_row_plan(x: torch.Tensor, n: int, k: int, group: int) -> Optional[tuple[triton.Config, int]]:
    """(config, K split) for one row on CUDA when ONE_ROW_CONFIG serves the weights (16-bit x,
    sequential groups of a multiple of 128); None: autotune. The split: the largest power of two
    keeping N / 16 * split <= ONE_ROW_PROGRAMS_PER_SM * SMs (at most one 128-input tile a
    split). Chosen on the H100 (benchmarks/int4_gemv_sweep.py, every tiling at K splits 1..32
    with the weights cycled past L2, as a decode step reads them): this config at these splits
    was the fastest or within 2% of it at all four Llama-3.1-8B projections, where timing the
    candidates in the warm-up (the weights hot in L2) picked tilings 5-15% slower."""
    if not path_fits(ONE_ROW_CONFIG, group, x.dtype) or not x.is_cuda:
        return None
    return ONE_ROW_CONFIG, one_row_split(n, k, sm_count(x.device))


def one_row_split(n: int, k: int, sms: int) -> int:
    """_one_row_plan's K split: the largest power of two with N / BLOCK_N * split <=
    ONE_ROW_PROGRAMS_PER_SM * sms, at least 1, at most one BLOCK_K tile a split."""
    want = ONE_ROW_PROGRAMS_PER_SM * sms * ONE_ROW_CONFIG.kwargs["BLOCK_N"] // n
    split = 1 << (want.bit_length() - 1) if want > 1 else 1
    return max(1, min(split, k // ONE_ROW_CONFIG.kwargs["BLOCK_K"]))


def _int4_mm(x, qweight, scales, zeros, g_idx, group_size: int, split, config, fuse: bool) -> torch.Tensor:
    m, k = x.shape
    n = scales.shape[1]
    block_m = m_bucket(m)
    launch = {}     # the one-row plan's config alone has the PDL prologue
    if split is None and config is None and block_m == 1:
        plan = _one_row_plan(x, n, k, _sequential_group(group_size))
        if plan is not None:
            config, split = plan
            launch = pdl_launch(x)
    if block_m > GEMV_MAX_M:    # enough programs along M: no K split
        split = 1
    plan = plan_split(k, triton.cdiv(n, SPLIT_BLOCK_N), SPLIT_BLOCK_K, sm_count(x.device),
                      split or _split_cap(k, n, sm_count(x.device)))
    m_blocks = triton.cdiv(m, block_m)
    partial = plan.split > 1     # (a split launch has one M block: a counter per output tile)
    y, out, cnt, fuse = split_buffers(m, n, plan.split, x.dtype, x.device, fuse, MIN_BLOCK_N)
    args = (x, qweight, scales, zeros, g_idx, out, y, cnt, m, n, k, plan.k_per_split, x.stride(0), k // 8,
            plan.k_per_split // 8)
    meta = dict(GROUP=_sequential_group(group_size), PARTIAL=partial, FUSE=fuse, FP32=x.dtype == torch.float32,
                BLOCK_M=block_m, ASM=x.is_cuda)
    key = (n, k, plan.k_per_split, block_m, meta["GROUP"], x.dtype)
    if config is None and may_autotune(x, key, _tuned_keys):
        _mm_tuned[lambda a: (triton.cdiv(n, a["BLOCK_N"]), plan.split, m_blocks)](*args, **meta)
    else:   # the interpreter (no timing there), a forced config or a capture: the bucket's first fitting one
        cfg = config or next(c for c in GEMV_CONFIGS[block_m]
                             if not c.kwargs["DOT16"] and c.kwargs["WPT"] == 1 and config_fits(c, block_m, k, plan.k_per_split))
        if not (config_fits(cfg, block_m, k, plan.k_per_split) and path_fits(cfg, meta["GROUP"], x.dtype)):
            raise ValueError(f"int4_gemm: config {cfg.kwargs} does not serve M={m}, K={k}, split {plan}, "
                         f"group {group_size}, x {x.dtype}")
        _mm_fixed[(triton.cdiv(n, cfg.kwargs["BLOCK_N"]), plan.split, m_blocks)](
            *args, **meta, **cfg.kwargs, **launch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return splitk_reduce(out, x.dtype) if partial and not fuse else y


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, K8,
                      stride_xm, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP32: tl.constexpr):
    offs_m, offs_n, mask_m, mask_n = tile_offsets(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kw = tl.arange(0, BLOCK_K // 8)
    kin0 = kw[:, None] * 8 + tl.arange(0, 8)[None, :]                        # [BK/8, 8]
    row_ptr = qw_ptr + (offs_n // 4 * K8) * 4 + offs_n % 4                   # word 0 of each output
    for k0 in range(0, K, BLOCK_K):
        kin = k0 + kin0
        km = kin < K
        words = tl.load(row_ptr[:, None] + ((k0 // 8 + kw) * 4)[None, :],
                        mask=mask_n[:, None] & (k0 + kw * 8 < K)[None, :], other=0)          # [BN, BK/8]
        qf = tl.reshape(_nibbles(tl.reshape(words, (BLOCK_N, BLOCK_K // 8, 1)), False), (BLOCK_N, BLOCK_K // 8, 8))
        g = tl.load(g_ptr + kin, mask=km, other=0)
        ptr = g[None, :, :] * N + offs_n[:, None, None]
        mk = mask_n[:, None, None] & km[None, :, :]
        s = tl.load(s_ptr + ptr, mask=mk, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + ptr, mask=mk, other=0).to(tl.float32) + MAGIC_F
        w = tl.reshape((qf - z) * s, (BLOCK_N, BLOCK_K))
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
              config: Optional[triton.Config] = None, fuse_reduce: bool = True) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype (kernel layout, module docstring). ``group_size`` > 0
    promises g_idx == k // group_size (scales then read by row); 0: read g_idx. One kernel for
    every M (its bucket picks the path); ``split`` forces the K-split count at M <= 16,
    ``config`` one of GEMV_CONFIGS for the M bucket instead of autotuning (tests, benchmarks);
    ``fuse_reduce=False`` sums a K split in a second launch (the same bits; tests, benchmarks)."""
    x = _check(x, qweight, scales)
    if x.shape[0] == 0:
        return torch.empty(0, scales.shape[1], dtype=x.dtype, device=x.device)
    return _int4_mm(x, qweight, scales, zeros, g_idx, group_size, split, config, fuse_reduce)


def int4_gemm_tiled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """The tiled kernel at any M (16 x 32 tiles up to 16 rows: benchmarks compare it)."""
    x = _check(x, qweight, scales)
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = (16, 32) if m <= GEMV_MAX_M else (64, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](x, qweight, scales, zeros, g_idx, y, m, n, k, k // 8, x.stride(0), y.stride(0),
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, FP32=x.dtype == torch.float32)
    return y


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    k, n = x.shape[1], scales.shape[1]
    if k % 8 or tuple(qweight.shape) != (triton.cdiv(n, ROWS), k // 8, ROWS):
        raise ValueError(f"int4_gemm: qweight {tuple(qweight.shape)} is not the kernel layout "
                         f"[ceil(N/4), K/8, 4] for K {k}, N {n}")
    return x.contiguous()
