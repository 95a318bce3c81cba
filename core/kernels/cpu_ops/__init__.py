"""The C++ CPU versions of the fused layer ops (fused_ops.cpp), built at first use by kvyard.kernels.cpp_build.

Each wrapper takes what the matching Triton op in kvyard.kernels.triton_ops takes and returns the same;
kvyard.kernels decides when they run. ``available()`` says whether the library builds and loads
here; the first failure is logged once and the layers keep their torch code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from kvyard.kernels.cpp_build import CppLibrary, OptionalLibrary

LIBRARY = CppLibrary(name="cpu_fused_ops", sources=(Path(__file__).with_name("fused_ops.cpp"),),
                     headers=(Path(__file__).with_name("layer_ops.h"),), extra_flags=("-ffp-contract=off",))


def available() -> bool:
    return _LIBRARY.available()


def _register_fake() -> None:
    """Shapes for torch.compile's tracing (the ops are opaque to inductor)."""
    @torch.library.register_fake("kvyard_cpu_ops::rmsnorm")
    def _rmsnorm(x, weight, eps, residual):
        return torch.empty_like(x), (torch.empty_like(x) if residual is not None else x.new_empty(0))

    @torch.library.register_fake("kvyard_cpu_ops::rotary")
    def _rotary(x, cos, sin):
        return x.new_empty(x.shape)

    @torch.library.register_fake("kvyard_cpu_ops::silu_and_mul")
    def _silu_and_mul(x):
        return x.new_empty((x.shape[0], x.shape[1] // 2))

    @torch.library.register_fake("kvyard_cpu_ops::kv_write")
    def _kv_write(k_buf, v_buf, loc, k, v):
        return None


_LIBRARY = OptionalLibrary(LIBRARY, "CPU fused ops", _register_fake)


def _ops():
    if not available():
        raise RuntimeError("kvyard's CPU fused ops could not be built here (see the log)")
    return torch.ops.kvyard_cpu_ops


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [rows, N] with contiguous rows (a view when the layout allows)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
    """x [..., N] -> normed; with ``residual`` -> (normed, x + residual)."""
    normed, summed = _ops().rmsnorm(
        _rows(x), weight, eps, None if residual is None else _rows(residual))
    if residual is None:
        return normed.view(x.shape)
    return normed.view(x.shape), summed.view(x.shape)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, 1, D] -> x * cos + rotate_half(x) * sin, a new [T, H, D]."""
    return _ops().rotary(x, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> silu(x[..., :d]) * x[..., d:]."""
    out = _ops().silu_and_mul(_rows(x))
    return out.view(*x.shape[:-1], x.shape[-1] // 2)


def write_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k/v [T, Hkv, D] or [T, Hkv * D] into the pools' rows ``loc`` [T] (int64)."""
    _ops().kv_write(k_buf, v_buf, loc, _rows(k.flatten(1)), _rows(v.flatten(1)))
