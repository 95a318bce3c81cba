"""The GGUF int kernel at each SIMD level (AVX-512 VNNI, AVX2, portable) against
dequantize-then-matmul, for the decode shapes: M in 1..4, K not a multiple of 256, N not a
multiple of 16 (the last rows of a row-interleaved weight stay planar), float32 and bfloat16
activations read as they come. Each level multiplies the layout ``prepare`` gives at that level
(on AVX-512: 16-row tiles for Q4_0/Q4_1/Q8_0). Levels this machine lacks are skipped.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kvyard_plugins.quantization import gguf_kernels

Q = gguf.GGMLQuantizationType
LEGACY = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# Relative to the largest |y|: int16 activations (float32 x), or the bf16 output's rounding.
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def best_level_after():
    gguf_kernels.load()
    yield
    gguf_kernels.set_simd_level(gguf_kernels.SIMD_LEVELS[-1])


def at_level(level: str) -> None:
    if gguf_kernels.set_simd_level(level) != level:
        pytest.skip(f"this build has no {level} kernels")


def weight(qtype: Q, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(file blocks, float64 reference weight)."""
    rng = np.random.default_rng(seed)
    data = gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    return data, torch.from_numpy(gguf.quants.dequantize(data, qtype)).double()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("level", gguf_kernels.SIMD_LEVELS)
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda q: q.name)
@pytest.mark.parametrize("cols", [96, 160, 576])   # 3, 5 (odd), 18 blocks: none a multiple of 8
def test_int_kernel_matches_dequantized_matmul(level, qtype, cols):
    at_level(level)
    data, ref_w = weight(qtype, 37, cols)
    w, layout = gguf_kernels.prepare(torch.from_numpy(data), qtype, cols)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 2, 3, 4):
            x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(dtype)
            y = gguf_kernels.matmul(x, w, layout, cols, path="int")
            assert y.dtype == dtype and y.shape == (m, 37)
            err = relative_error(y, x.double() @ ref_w.T)
            assert err < TOLERANCE[dtype], (level, dtype, m, err)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_row_interleaved_layout_keeps_the_bytes_and_dequantizes_exactly(qtype):
    at_level("avx512")
    data, ref_w = weight(qtype, 40, 160)   # two whole tiles and 8 planar rows
    w, layout = gguf_kernels.prepare(torch.from_numpy(data), qtype, 160)
    assert layout == gguf_kernels.X16_BASE + int(qtype)
    assert w.shape == data.shape and w.dtype == torch.uint8
    assert torch.equal(gguf_kernels.dequantize(w, layout, 160).double(), ref_w)
    x = torch.randn(20, 160)   # the dense path (dequantized tiles, gemm) reads the layout too
    y = gguf_kernels.matmul(x, w, layout, 160, path="dense")
    assert relative_error(y, x.double() @ ref_w.T) < 2e-6


def test_row_interleaved_weights_still_multiply_after_the_level_is_lowered():
    at_level("avx512")
    data, ref_w = weight(Q.Q4_1, 32, 96)
    w, layout = gguf_kernels.prepare(torch.from_numpy(data), Q.Q4_1, 96)
    x = torch.randn(3, 96)
    fast = gguf_kernels.matmul(x, w, layout, 96, path="int")
    gguf_kernels.set_simd_level("avx2")   # no tile kernel below AVX-512: the portable reading
    slow = gguf_kernels.matmul(x, w, layout, 96, path="int")
    ref = x.double() @ ref_w.T
    assert relative_error(fast, ref) < 2e-4 and relative_error(slow, ref) < 2e-4


def test_bfloat16_activations_are_not_copied_to_float():
    data, _ = weight(Q.Q4_1, 64, 576)
    w, layout = gguf_kernels.prepare(torch.from_numpy(data), Q.Q4_1, 576)
    x = torch.randn(1, 576).to(torch.bfloat16)
    with torch.profiler.profile() as prof:
        gguf_kernels.matmul(x, w, layout, 576, path="int")
    names = {e.name for e in prof.events()}
    assert "kvyard_gguf::mm_int" in names
    assert not names & {"aten::to", "aten::_to_copy", "aten::copy_"}, names
