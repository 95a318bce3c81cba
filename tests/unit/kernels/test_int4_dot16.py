"""The int4 GEMV's DOT16 path (int4_gemm module docstring) in the Triton CPU interpreter: (q - z)
exact in x's 16-bit dtype, a 16-row tensor-core dot per K tile, the tile's scale row in float32;
its PTX emulated bit for bit against the interpreter's expression; the prune rules.

Tolerance, per output n: |y - ref| <= e_out |ref| + c sum_k |x_k| |w_nk| (float64 reference).
  e_out: the output's rounding (fp16: 2^-10).
  c = (BLOCK_K + K / BLOCK_K + 1) 2^-23: the products (q - z) x are exact; a tile's BLOCK_K
  products summed in float32 (the tensor core may truncate: 2^-23 a step, not 2^-24), its
  scale multiply (one rounding) and the K / BLOCK_K tile sums. K 512, BLOCK_K 128: 1.6e-5;
  one wrong nibble is ~1 / (4.5 K) = 4e-4 of sum|x||w|: the bound catches it. Against the
  existing path: the sum of both paths' bounds (the fold's 2^-16, test_int4_fold.py).
numpy runs the interpreter's fp16 dot in float32 on exact fp16 values, so fp16 is tested
honestly. bf16 is not run through the kernel here: the interpreter stores bf16 as its uint16
bits and its tl.dot multiplies those bits as integers; the bf16 PTX is checked bit for bit
below (q - z exact in bf16) and tests/gpu/test_gpu_int4.py runs every DOT16 config in bf16.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import re

import pytest
import torch

from kvyard.layers.quantized_linear import int4_kernel_layout
from quant_helpers import int4_weights as _weights

pytest.importorskip("triton")

from kvyard.kernels.triton_ops import int4_gemm as i4           # noqa: E402

OUT_EPS = {torch.float16: 2.0 ** -10}
FOLD_TOL = 2.0 ** -16
# (none at one row: bucket 1 has none, the CUDA-core tilings beat them there)
DOT16 = {b: [c for c in i4.GEMV_CONFIGS[b] if c.kwargs["DOT16"]] for b in (2, 4, 16)}



def _dot16_configs(m, group):
    """The bucket's DOT16 configs whose K tile divides the group."""
    return [c for c in DOT16[i4.m_bucket(m)] if group % c.kwargs["BLOCK_K"] == 0]


def _check(got, ref, mass, dtype, c):
    err = (got.double() - ref).abs()
    worst = (err / (OUT_EPS[dtype] * ref.abs() + c * mass)).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x the bound"


@pytest.mark.parametrize("m,k,n,group,symmetric,split", [
    (2, 512, 96, 128, False, None), (2, 256, 64, 64, True, 2), (3, 512, 64, 128, True, 2),
    (3, 256, 96, 128, False, 1), (16, 512, 96, 64, False, 4), (16, 256, 64, 128, True, None)])
def test_dot16_fp16_equals_float64_reference_and_existing_path(m, k, n, group, symmetric, split):
    """Every DOT16 config that serves the group (N 64 / 96: tiles of 64..512 outputs, masked)."""
    canon, w = _weights(n, k, group, symmetric, torch.float16, seed=m * k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n + m)).half()
    ref, mass = x.double() @ w.t(), x.double().abs() @ w.abs().t()
    layout = int4_kernel_layout(*canon[:3])
    existing = i4.int4_gemm(x, *layout, canon[3], group, split=split)      # the bucket's first config
    configs = _dot16_configs(m, group)
    assert configs
    for cfg in configs:
        got = i4.int4_gemm(x, *layout, canon[3], group, split=split, config=cfg)
        assert got.dtype == torch.float16 and got.shape == (m, n)
        c = (cfg.kwargs["BLOCK_K"] + k / cfg.kwargs["BLOCK_K"] + 1) * 2.0 ** -23
        _check(got, ref, mass, torch.float16, c)
        _check(got, existing.double(), mass, torch.float16, 2 * (c + FOLD_TOL))


def _prune(block_m, group, dtype, k=4096, kps=4096):
    named = {"K": k, "K_PER_SPLIT": kps, "x_ptr": torch.empty(1, dtype=dtype)}
    return i4._prune(i4.ALL_CONFIGS, named, BLOCK_M=block_m, GROUP=group)


def test_one_row_has_no_dot16():
    assert not any(c.kwargs["DOT16"] for c in i4.GEMV_CONFIGS[1])


@pytest.mark.parametrize("block_m", [2, 4, 16])
def test_prune_keeps_dot16_only_where_it_applies(block_m):
    kept = [c for c in _prune(block_m, 128, torch.bfloat16) if c.kwargs["DOT16"]]
    assert kept == DOT16[block_m] and kept
    assert not any(c.kwargs["DOT16"] for c in _prune(block_m, 0, torch.bfloat16))        # act-order
    assert not any(c.kwargs["DOT16"] for c in _prune(block_m, 128, torch.float32))       # float32 x
    # group 64: only 64-wide K tiles; a split of 192 inputs: no 128-wide K tile of any path
    assert all(c.kwargs["BLOCK_K"] == 64 for c in _prune(block_m, 64, torch.float16) if c.kwargs["DOT16"])
    assert all(c.kwargs["BLOCK_K"] == 64 for c in _prune(block_m, 128, torch.float16, kps=192) if c.kwargs["DOT16"])


def test_fallback_never_picks_dot16_and_a_forced_misfit_is_refused():
    for bucket, configs in DOT16.items():
        first = next(i for i, c in enumerate(i4.GEMV_CONFIGS[bucket]) if c.kwargs["DOT16"])
        assert all(c.kwargs["DOT16"] for c in i4.GEMV_CONFIGS[bucket][first:])       # appended last
    canon, _ = _weights(64, 256, 128, False, torch.float32, seed=1)
    layout = int4_kernel_layout(*canon[:3])
    for x, group in ((torch.randn(2, 256), 128), (torch.randn(2, 256).half(), 0)):
        with pytest.raises(ValueError, match="does not serve"):
            i4.int4_gemm(x, *layout, canon[3], group, config=DOT16[2][0])


def _run_dot16_ptx(ptx: str, word: int, zz: int, dtype) -> list[float]:
    """Emulate the DOT16 PTX (shr / prmt / lop3 on .b32, sub.rn on 16-bit pairs, mov.b32 split)."""
    regs, m32 = {"$8": word, "$9": zz}, 0xFFFFFFFF

    def val(a):
        return regs[a] if a in regs else int(a, 0)

    def halves(v):
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(dtype)

    for op, args in re.findall(r"(shr\.b32|prmt\.b32|lop3\.b32|sub\.rn\.\w+|mov\.b32)\s+([^;]+);", ptx):
        if op == "mov.b32":
            lo, hi, src = re.match(r"\{(\$\d+),\s*(\$\d+)\},\s*(\w+)", args).groups()
            regs[lo], regs[hi] = (float(v) for v in halves(regs[src]))
            continue
        d, *a = [s.strip() for s in args.split(",")]
        if op == "shr.b32":
            regs[d] = val(a[0]) >> val(a[1])
        elif op == "prmt.b32":   # byte i of d: byte (selector nibble i) of {a, b} (a bytes 0..3)
            pool, sel = val(a[0]) | val(a[1]) << 32, val(a[2])
            regs[d] = sum(((pool >> (8 * (sel >> (4 * i) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "lop3.b32":
            x, y, z, lut = (val(v) for v in a)
            regs[d] = sum(((lut >> (4 * (x >> j & 1) + 2 * (y >> j & 1) + (z >> j & 1))) & 1) << j
                          for j in range(32))
        else:   # sub.rn on both 16-bit halves (the exact difference, rounded to the dtype)
            diff = (halves(val(a[0])).double() - halves(val(a[1])).double()).to(dtype)
            bits = diff.view(torch.int16).to(torch.int32) & 0xFFFF
            regs[d] = int(bits[0]) | int(bits[1]) << 16 & m32
    return [regs[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("dtype,ptx,magic", [(torch.bfloat16, i4._DOT16_BF16_PTX, i4.MAGIC16["bf16"]),
                                             (torch.float16, i4._DOT16_FP16_PTX, i4.MAGIC16["fp16"])])
def test_dot16_ptx_gives_q_minus_z(dtype, ptx, magic):
    gen = torch.Generator().manual_seed(4)
    nib = torch.arange(16, dtype=torch.int64)
    words = [int(w) for w in sum(nib << (4 * i) for i in range(8))]
    words += torch.randint(0, 2 ** 32, (16,), dtype=torch.int64, generator=gen).tolist()
    for word in words:
        for z in (0, 7, 8, 15):
            got = _run_dot16_ptx(ptx.value, word, magic | z * 0x10001, dtype)
            assert got == [float((word >> (4 * i) & 0xF) - z) for i in range(8)]
