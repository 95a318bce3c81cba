"""Python face of the GGUF CPU kernels: type support, path choice, torch.compile fakes.

``matmul(x [M, K], data uint8 [N, bytes_per_row], qtype, K) -> [M, N]`` in x's dtype. Two
kernels (gguf_kernels.cpp): "int" quantizes x to int16 per 32-block and dots it with the decoded
weight rows (decode-sized M: memory-bound, no float weight copy); "dense" dequantizes L2-sized
row chunks and calls the gemm (prefill-sized M: compute-bound). ``DENSE_MIN_M`` is where dense
starts winning (benchmarks/gguf_matmul.py --all-paths measures it). x is read in its dtype (float32 or
bfloat16: no copies) and y written in it.

``prepare`` lays the file's blocks out for the SIMD level in force when the weights load: on
AVX-512 VNNI, Q4_0/Q4_1/Q8_0 in tiles of 16 interleaved rows (X16), the other legacy formats
planar. Every kernel reads every layout, so a level lowered later (``set_simd_level``) stays
correct, only slower for X16 weights.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import gguf
import numpy as np
import torch

from kvyard_plugins.quantization import gguf_build

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# Formats the kernels multiply in place; anything else is dequantized at load.
SUPPORTED = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                       Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
# Formats gguf.quants.quantize can produce (the K-quants it only dequantizes).
PY_QUANTIZABLE = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0})
# Byte offsets of each K-quant block's fp16 super-block scales (d, dmin).
K_QUANT_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                         Q.Q6_K: (208,)}

# Legacy formats the int kernel multiplies faster after a planar repack (same bytes per row,
# regrouped into qs / scale planes; gguf_formats.h). Their kernel layout id is PLANAR_BASE + id.
PLANAR = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0})
PLANAR_BASE = 256
# Formats laid out in row-interleaved tiles of 16 rows where the int kernel runs AVX-512 VNNI at
# load (same bytes; gguf_formats.h, X16); their layout id is X16_BASE + id.
X16 = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0})
X16_BASE = 512

# M at which "dense" (dequantize + gemm) takes over from "int", for every layout. The interleaved
# layouts' int kernel is faster up to M ~48, but its int16 activations are not the dense path's
# float ones, and prefill chunks of 16 must stay greedy-equal to the dequantized model.
DENSE_MIN_M = 16
# Decode steps (one new token per request, run by the lowered decode plans) take the int kernel
# further for the interleaved layouts, where it beats dequantize + gemm up to M ~48 (SmolLM2's
# layers at M = 32: 0.5-0.8x the dense time). Prefill keeps DENSE_MIN_M; a decode row's result
# does not depend on the other rows (per-row activation scales, exact int sums), so decode tokens
# are the same at batch 1 and batch 47.
DECODE_INT_MAX_M_X16 = 47
PATHS = ("auto", "int", "dense")

_state: dict[str, object] = {}
_ops = None   # torch.ops.kvyard_gguf once loaded (looked up once: it sits on every forward)


# The int kernel's SIMD paths, best last; KVYARD_GGUF_SIMD=<name> caps the one used (default: the
# best this build has; KVYARD_GGUF_PORTABLE=1 builds without any).
SIMD_LEVELS = ("portable", "avx2", "avx512")


def load() -> None:
    """Builds/loads the library and registers the fake kernels; raises KernelBuildError."""
    global _ops
    if "loaded" in _state:
        return
    gguf_build.load()
    _register_fakes()
    _ops = torch.ops.kvyard_gguf
    _state["loaded"] = True
    _state["native_bf16"] = bool(torch.ops.kvyard_gguf.native_bf16())
    cap = os.environ.get("KVYARD_GGUF_SIMD", "").strip().lower()
    if cap:
        if cap not in SIMD_LEVELS:
            raise ValueError(f"KVYARD_GGUF_SIMD={cap!r}; valid: {', '.join(SIMD_LEVELS)}")
        set_simd_level(cap)


def simd_level() -> str:
    """The SIMD path the int kernel takes now: one of SIMD_LEVELS."""
    load()
    return SIMD_LEVELS[int(_ops.simd_level())]


def set_simd_level(level: str) -> str:
    """Caps the int kernel's SIMD path at ``level`` (tests: the AVX2 and portable paths on an
    AVX-512 machine); returns the path now taken (never above what the build has)."""
    load()
    return SIMD_LEVELS[int(_ops.set_simd_level(SIMD_LEVELS.index(level)))]


def available() -> bool:
    """Whether the kernels can be used here; the first failure is logged, not raised."""
    if "error" in _state:
        return False
    try:
        load()
        return True
    except Exception as exc:  # no compiler, incompatible toolchain: callers fall back to dense
        _state["error"] = exc
        logger.warning("GGUF CPU kernels unavailable, weights will be dequantized at load: %s", exc)
        return False


def native_bf16() -> bool:
    load()
    return bool(_state["native_bf16"])


def bytes_per_row(qtype: int, in_features: int) -> int:
    """Bytes of one row of in_features values in the file format ``qtype``."""
    block, type_size = gguf.GGML_QUANT_SIZES[Q(qtype)]
    if in_features % block:
        raise ValueError(f"in_features={in_features} is not a multiple of the {Q(qtype).name} "
                         f"block size {block}")
    return in_features // block * type_size


def prepare(data: torch.Tensor, qtype: int, in_features: int) -> tuple[torch.Tensor, int]:
    """File blocks uint8 [N, bytes_per_row] -> (the kernels' layout of them, its layout id).
    Same shape and bytes; the id is what matmul/dequantize take as ``qtype``."""
    load()
    if Q(qtype) in X16 and simd_level() == "avx512":
        return torch.ops.kvyard_gguf.repack_x16(data, int(qtype), in_features), X16_BASE + int(qtype)
    if Q(qtype) in PLANAR:
        return torch.ops.kvyard_gguf.repack(data, int(qtype), in_features), PLANAR_BASE + int(qtype)
    return data, int(qtype)


def decode_int_max_rows(layout: int) -> int:
    """The most rows a decode step's lowered call of layout id ``layout`` takes on the int kernel."""
    return DECODE_INT_MAX_M_X16 if layout >= X16_BASE else DENSE_MIN_M - 1


def matmul(x: torch.Tensor, data: torch.Tensor, qtype: int, in_features: int,
           bias: Optional[torch.Tensor] = None, path: str = "auto") -> torch.Tensor:
    """y = x @ dequantize(data).T (+ bias): x [M, K] float32/bfloat16 -> [M, N] in x's dtype.
    ``qtype`` is a layout id: a ggml type id, or one returned by prepare()."""
    if _ops is None:
        load()
    if path == "auto":
        path = "int" if x.shape[0] < DENSE_MIN_M else "dense"
    if path == "int":
        return _ops.mm_int(x, data, qtype, in_features, bias)
    if path == "dense":
        bf16_gemm = x.dtype == torch.bfloat16 and bool(_state["native_bf16"])
        return _ops.mm_dense(x, data, qtype, in_features, bias, bf16_gemm)
    raise ValueError(f"path={path!r}; valid: {', '.join(PATHS)}")


def dequantize(data: torch.Tensor, qtype: int, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, bytes_per_row] -> [N, in_features]; bit-identical to gguf.quants.dequantize.
    ``qtype`` is a layout id, as for matmul."""
    load()
    return torch.ops.kvyard_gguf.dequantize(data, int(qtype), in_features, dtype)


def random_blocks(qtype: int, rows: int, in_features: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Valid random K-quant blocks (uint8 [rows, bytes_per_row]) for tests and benchmarks:
    random quant bytes, super-block scales drawn from [0.001, 0.01] so values stay sane."""
    qtype = Q(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, in_features // block, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[qtype]:
        scales = rng.uniform(0.001, 0.01, size=raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def _register_fakes() -> None:
    """Shape functions so torch.compile can trace through the kernels without running them."""
    if "fakes" in _state:
        return

    @torch.library.register_fake("kvyard_gguf::mm_int")
    def _mm_int(x, w, qtype, in_features, bias):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("kvyard_gguf::mm_dense")
    def _mm_dense(x, w, qtype, in_features, bias, bf16_gemm):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("kvyard_gguf::dequantize")
    def _dequantize(w, qtype, in_features, dtype):
        return w.new_empty((w.shape[0], in_features), dtype=dtype)

    @torch.library.register_fake("kvyard_gguf::repack")
    def _repack(w, qtype, in_features):
        return torch.empty_like(w)

    @torch.library.register_fake("kvyard_gguf::repack_x16")
    def _repack_x16(w, qtype, in_features):
        return torch.empty_like(w)

    _state["fakes"] = True
