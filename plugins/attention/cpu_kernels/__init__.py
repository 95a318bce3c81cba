"""kvyard's C++ CPU attention kernels (paged_decode.cpp), built at first use by kvyard.kernels.cpp_build.

``paged_decode(q, k_pool, v_pool, table, rows, lens, scale)``: decode attention read straight
from the paged pool (shapes in the source). ``available()`` says whether the library builds and
loads here; the first failure is logged once and callers keep their torch path.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kvyard.kernels.cpp_build import CppLibrary, OptionalLibrary

LIBRARY = CppLibrary(name="attention_kernels",
                     sources=(Path(__file__).with_name("paged_decode.cpp"),))


def available() -> bool:
    """Whether the kernels can run here (KVYARD_CPU_ATTENTION_KERNELS=0 turns them off)."""
    return _LIBRARY.available()


def _register_fake() -> None:
    @torch.library.register_fake("kvyard_attn::paged_decode")
    def _paged_decode(q, k_pool, v_pool, table, rows, lens, scale):
        return torch.empty_like(q)


_LIBRARY = OptionalLibrary(LIBRARY, "CPU attention kernels", _register_fake,
                           disable_env="KVYARD_CPU_ATTENTION_KERNELS")


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                 rows: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]; see paged_decode.cpp."""
    return torch.ops.kvyard_attn.paged_decode(q, k_pool, v_pool, table, rows, lens, scale)
