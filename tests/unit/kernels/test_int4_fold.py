"""The int4 GEMV's folded zero point (M 1..2, sequential groups; int4_gemm module docstring) in
the Triton CPU interpreter: the planes 16 + q, the PTX of both plane functions (emulated: the
interpreter runs the Triton expression, so the PTX strings are checked against it bit for bit),
and the kernel against a float64 reference and against the same kernel's per-weight
dequantization (the act-order path through g_idx, unchanged).

Tolerance, per output n: |y - ref| <= e_out |ref| + 2^-16 sum_k |x_k| |w_nk|.
  e_out: the output's own rounding, one unit in the last place relative to the value (bf16
  2^-7, fp16 2^-10: the interpreter's bfloat16 cast truncates; float32 output 0).
  2^-16 sum|x||w|: the folded sum of a word rounds float32 terms of size < 32 s sum_word |x|
  (planes 16 + q < 32): the chain's 8 roundings, the 3-level word sum (< sum|x|) times
  16 + z < 32, the final FMA: < 400 * 2^-24 * s sum_word|x| = 2.4e-5 s sum_word|x|, and the
  float32 accumulation over words adds far less; with random q and z the mean |q - z| is >= 4,
  so the worst case is < 6e-6 sum|x||w| < 2^-16 sum|x||w| = 1.5e-5 (measured: ~6e-8 with
  float32 x). One wrong nibble (an error of ~s |x_k| ~ sum|x||w| / (4.5 K)) is ~4e-4 of
  sum|x||w| at K = 512: the bound catches it.
M 1..2 take the fold (FOLD_MAX_M); M 3..4 the per-weight subtraction: both are held to it.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import re

import pytest
import torch

from kvyard.layers.quantized_linear import int4_kernel_layout
from quant_helpers import int4_weights as _weights

pytest.importorskip("triton")

import triton                                                   # noqa: E402
import triton.language as tl                                    # noqa: E402

from kvyard.kernels.triton_ops import int4_gemm as i4           # noqa: E402

OUT_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 0.0}
FOLD_TOL = 2.0 ** -16



def _check(got, ref, mass, dtype, scale=1.0):
    err = (got.double() - ref).abs()
    bound = scale * (OUT_EPS[dtype] * ref.abs() + FOLD_TOL * mass)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x the bound"


@pytest.mark.parametrize("m,k,n,group,symmetric,dtype,split", [
    (1, 512, 96, 128, False, torch.bfloat16, None), (1, 256, 70, 32, True, torch.float16, 2),
    (2, 384, 64, 64, False, torch.float32, 3), (2, 512, 72, 128, True, torch.bfloat16, 2),
    (3, 256, 96, 64, True, torch.float32, None), (3, 384, 64, 32, False, torch.bfloat16, 1),
    (4, 256, 70, 128, False, torch.float16, 2), (4, 512, 64, 32, True, torch.float32, None)])
def test_folded_gemv_equals_float64_reference_and_per_weight_path(m, k, n, group, symmetric, dtype, split):
    """Default configs (the bucket's first fitting one), N not always a multiple of the tile or
    of 4 (padded outputs), K split or whole."""
    canon, w = _weights(n, k, group, symmetric, dtype, seed=m * k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n + m)).to(dtype)
    ref, mass = x.double() @ w.t(), x.double().abs() @ w.abs().t()
    layout = int4_kernel_layout(*canon[:3])
    got = i4.int4_gemm(x, *layout, canon[3], group, split=split)
    assert got.dtype == dtype and got.shape == (m, n)
    _check(got, ref, mass, dtype)
    per_weight = i4.int4_gemm(x, *layout, canon[3], 0, split=split)      # (q - z) s per input
    _check(got, per_weight.double(), mass, dtype, scale=2.0)


@pytest.mark.parametrize("index,group", [(0, 128), (4, 128), (5, 32), (4, 64)])
def test_folded_gemv_every_group_shape(index, group):
    """M = 1 configs whose tile holds one group (group >= BLOCK_K: [R4, 1, 4] scales) or one
    group per word (group < BLOCK_K)."""
    cfg = i4.GEMV_CONFIGS[1][index]
    canon, w = _weights(64, 512, group, False, torch.bfloat16, seed=index + group)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(group)).bfloat16()
    got = i4.int4_gemm(x, *int4_kernel_layout(*canon[:3]), canon[3], group, split=1, config=cfg)
    _check(got, x.double() @ w.t(), x.double().abs() @ w.abs().t(), torch.bfloat16)


WIDE = [c for c in i4.GEMV_CONFIGS[1] if c.kwargs["WPT"] > 1]


@pytest.mark.parametrize("cfg", WIDE, ids=lambda c: "{BLOCK_N}x{BLOCK_K}-wpt{WPT}".format(**c.kwargs))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wide_configs_every_dtype_masked_and_split(cfg, dtype):
    """The WPT configs (each thread WPT words of its outputs; bf16 x read as uint32 pairs; the
    pipelined ones 16-bit x only): the group of their K tile, N 70 (masked outputs), K whole and
    in 2 splits (K 512: 4 tiles, 2 a split, the last prefetch reloading the split's last)."""
    if cfg.kwargs["PIPE"] and dtype == torch.float32:
        pytest.skip("16-bit x only (test_wide_configs_refuse_what_they_do_not_serve)")
    group = cfg.kwargs["BLOCK_K"]
    canon, w = _weights(70, 512, group, False, dtype, seed=cfg.kwargs["BLOCK_N"] + cfg.kwargs["WPT"])
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(group)).to(dtype)
    ref, mass = x.double() @ w.t(), x.double().abs() @ w.abs().t()
    layout = int4_kernel_layout(*canon[:3])
    for split in (1, 2):
        _check(i4.int4_gemm(x, *layout, canon[3], group, split=split, config=cfg), ref, mass, dtype)


@pytest.mark.parametrize("n,k,sms,split", [(6144, 4096, 132, 8), (4096, 4096, 132, 8), (28672, 4096, 132, 2),
                                           (4096, 14336, 132, 8), (28672, 4096, 16, 1), (64, 256, 132, 2)])
def test_one_row_split(n, k, sms, split):
    """The one-row plan's split: ~ONE_ROW_PROGRAMS_PER_SM one-warp programs an SM (the splits
    the H100 sweep found fastest at the Llama-3.1-8B projections), at most one tile a split."""
    assert i4.one_row_split(n, k, sms) == split


def test_one_row_plan_is_cuda_16_bit_and_whole_groups_only():
    assert i4.ONE_ROW_CONFIG.kwargs["PIPE"] and i4.ONE_ROW_CONFIG in i4.GEMV_CONFIGS[1]
    assert i4._one_row_plan(torch.empty(1, 512, dtype=torch.bfloat16), 64, 512, 128) is None     # CPU


def test_wide_configs_refuse_what_they_do_not_serve():
    """A group the K tile straddles; float32 x for a pipelined one."""
    canon, _ = _weights(64, 512, 32, False, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="does not serve"):
        i4.int4_gemm(torch.randn(1, 512).bfloat16(), *int4_kernel_layout(*canon[:3]), canon[3], 32, split=1,
                     config=WIDE[0])
    canon, _ = _weights(64, 512, 128, False, torch.float32, seed=0)
    pipe = next(c for c in WIDE if c.kwargs["PIPE"])
    with pytest.raises(ValueError, match="does not serve"):
        i4.int4_gemm(torch.randn(1, 512), *int4_kernel_layout(*canon[:3]), canon[3], 128, split=1, config=pipe)


@triton.jit
def _planes_kernel(w_ptr, out_ptr, TOP: tl.constexpr):
    w = tl.load(w_ptr + tl.arange(0, 64))
    if TOP:
        p0, p1, p2, p3, p4, p5, p6, p7 = i4._top_planes(w, False)
    else:
        p0, p1, p2, p3, p4, p5, p6, p7 = i4._planes(w, False)
    offs = tl.arange(0, 64)
    tl.store(out_ptr + offs, p0)
    tl.store(out_ptr + 64 + offs, p1)
    tl.store(out_ptr + 128 + offs, p2)
    tl.store(out_ptr + 192 + offs, p3)
    tl.store(out_ptr + 256 + offs, p4)
    tl.store(out_ptr + 320 + offs, p5)
    tl.store(out_ptr + 384 + offs, p6)
    tl.store(out_ptr + 448 + offs, p7)


def _words():
    """64 words: every nibble value at every position, and random words."""
    gen = torch.Generator().manual_seed(3)
    nib = torch.arange(16, dtype=torch.int64)
    same = sum(nib << (4 * i) for i in range(8))                          # 16 words, q at every i
    rand = torch.randint(0, 2 ** 32, (48,), dtype=torch.int64, generator=gen)
    return torch.cat([same, rand])


def _planes(top: bool):
    words = _words()
    out = torch.empty(8, 64)
    _planes_kernel[(1,)](words.to(torch.uint32).view(torch.int32), out, TOP=top)
    return words, out


@pytest.mark.parametrize("top", [True, False])
def test_planes_are_offset_nibbles(top):
    words, out = _planes(top)
    q = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)]).float()
    assert torch.equal(out, q + (16.0 if top else 2.0 ** 23))


def _run_ptx(ptx: str, word: int) -> list[int]:
    """Emulate the plane PTX (shl / shr / lop3 / or on .b32) for one input word ($8)."""
    regs, m32 = {"$8": word}, 0xFFFFFFFF

    def val(a):
        return regs[a] if a in regs else int(a, 0)

    for op, args in re.findall(r"(shl\.b32|shr\.b32|lop3\.b32|or\.b32)\s+([^;]+);", ptx):
        d, *a = [s.strip() for s in args.split(",")]
        if op == "shl.b32":
            regs[d] = (val(a[0]) << val(a[1])) & m32
        elif op == "shr.b32":
            regs[d] = val(a[0]) >> val(a[1])
        elif op == "or.b32":
            regs[d] = val(a[0]) | val(a[1])
        else:   # lop3: bit j of the result is bit (4a + 2b + c) of the lut, per bit of a, b, c
            x, y, z, lut = (val(v) for v in a)
            regs[d] = sum(((lut >> (4 * (x >> j & 1) + 2 * (y >> j & 1) + (z >> j & 1))) & 1) << j
                          for j in range(32))
    return [regs[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("top", [True, False])
def test_plane_ptx_equals_the_triton_expression(top):
    """The CUDA path's inline PTX gives the interpreter's bits for every word tested."""
    words, out = _planes(top)
    ptx = (i4._TOP_PLANES_PTX if top else i4._PLANES_PTX).value
    expected = out.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for j, word in enumerate(words.tolist()):
        assert _run_ptx(ptx, word) == expected[:, j].tolist()
