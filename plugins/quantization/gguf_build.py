"""Builds and loads the GGUF CPU kernels (gguf_kernels.cpp) at first use, through the core's
C++ builder (kvyard.kernels.cpp_build: cached per machine under ``<cache>/gguf_kernels/<key>/``).

KVYARD_GGUF_PORTABLE=1 builds without -march=native: the portable C++ kernels instead of the
AVX2 ones (for tests, and for CPUs without AVX2/FMA/F16C, where the native build picks them too).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from kvyard.kernels.cpp_build import CppLibrary, KernelBuildError, build as _build, cache_root, load_library

__all__ = ["KernelBuildError", "build", "cache_root", "load"]

# -ffp-contract=off keeps dequantization bit-identical to gguf.quants (no fused q*scale+min).
LIBRARY = CppLibrary(name="gguf_kernels",
                     sources=(Path(__file__).with_name("gguf_kernels.cpp"),),
                     headers=(Path(__file__).with_name("gguf_formats.h"),),
                     extra_flags=("-ffp-contract=off",))

_loaded: Optional[Path] = None


def build(native: bool = True) -> Path:
    """The path of the compiled library, compiling it if this machine has no cached build."""
    return _build(LIBRARY, native=native)


def load() -> Path:
    """Compiles (once per machine) and loads the kernels into torch.ops.kvyard_gguf."""
    global _loaded
    if _loaded is None:
        portable = os.environ.get("KVYARD_GGUF_PORTABLE", "") in ("1", "true")
        _loaded = load_library(LIBRARY, native=not portable)
    return _loaded
