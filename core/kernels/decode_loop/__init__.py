"""The C++ decode loop (decode_loop.cpp): a pre-norm decoder's decode step over all layers in one
call, for small CPU batches. Built at first use by kvyard.kernels.cpp_build.

``NativePlan`` (native_step.cpp) is the same step in one OpenMP region over native kernel
descriptors (kvyard.kernels.native); it holds the descriptors' handles for as long as it lives.

``DecodePlan`` owns one plan in the library (freed with the object). What each linear layer and
the attention do is given as ``(op name, args)`` calls — the op is called as ``op(x, *args)`` —
which the quantization method (``LinearMethod.lower``) and the attention plugin
(``AttentionBackend.lower_decode``) supply; the loop itself knows only the fused layer ops of
kvyard.kernels.cpu_ops.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Sequence

import torch

from kvyard.kernels import cpu_ops
from kvyard.kernels.cpp_build import CppLibrary, OptionalLibrary
from kvyard.kernels.native import NativeKernel

LIBRARY = CppLibrary(name="cpu_decode_loop",
                     sources=(Path(__file__).with_name("decode_loop.cpp"), Path(__file__).with_name("native_step.cpp")),
                     headers=(Path(cpu_ops.__file__).with_name("layer_ops.h"), Path(__file__).with_name("team.h"),
                              Path(__file__).with_name("plan_table.h")), extra_flags=("-ffp-contract=off",))
QKV, O, GATE_UP, DOWN = range(4)   # a layer's linear slots

Call = tuple[str, Sequence]        # ("namespace::op[.overload]", args after x)


def available() -> bool:
    return cpu_ops.available() and _LIBRARY.available()


_LIBRARY = OptionalLibrary(LIBRARY, "CPU decode loop", lambda: None)


class DecodePlan:
    """One decoder's plan. Build: ``add_layer`` per layer in order, then ``add_linear`` for each of
    its four linear slots; then ``step`` any number of times."""

    def __init__(self, eps: float, final_norm: torch.Tensor):
        if not available():
            raise RuntimeError("kvyard's CPU decode loop could not be built here (see the log)")
        self._ops = torch.ops.kvyard_decode
        self.id = int(self._ops.plan_new(eps, final_norm))
        self.num_layers = 0
        weakref.finalize(self, self._ops.plan_free, self.id)

    def add_layer(self, in_norm: torch.Tensor, post_norm: torch.Tensor, k_buf: torch.Tensor,
                  v_buf: torch.Tensor, heads: int, kv_heads: int, head_dim: int, attention: Call) -> int:
        op, args = attention
        self._ops.plan_add_layer(self.id, in_norm, post_norm, k_buf, v_buf, heads, kv_heads, head_dim,
                                 op, list(args))
        self.num_layers += 1
        return self.num_layers - 1

    def add_linear(self, layer: int, which: int, calls: Sequence[Call], bias: torch.Tensor | None) -> None:
        """calls: one per output segment (outputs concatenated); bias: added after them, or None."""
        for op, args in calls:
            self._ops.plan_add_segment(self.id, layer, which, op, list(args))
        if bias is not None:
            self._ops.plan_set_bias(self.id, layer, which, bias)

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, loc: torch.Tensor,
             table: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """h [B, hidden] embeddings, cos/sin [B, 1, D] -> hidden [B, hidden] after the final norm."""
        return self._ops.decode_step(self.id, h, cos, sin, loc, table, rows, lens)


class NativePlan:
    """One decoder's plan for the native step. Build: ``add_layer`` per layer in order, then
    ``add_linear`` for each of its four linear slots; then ``step`` any number of times with at
    most ``max_rows`` rows (the smallest the descriptors allow, and the caller's cap)."""

    def __init__(self, eps: float, final_norm: torch.Tensor, max_rows: int):
        if not available():
            raise RuntimeError("kvyard's CPU decode loop could not be built here (see the log)")
        self._ops = torch.ops.kvyard_decode
        self.id = int(self._ops.native_plan_new(eps, final_norm, max_rows))
        self.num_layers = 0
        self._keep: list[NativeKernel] = []   # the descriptors' handles: valid while the plan lives
        weakref.finalize(self, self._ops.native_plan_free, self.id)

    def add_layer(self, in_norm: torch.Tensor, post_norm: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                  attention: NativeKernel) -> int:
        self._keep.append(attention)
        self._ops.native_plan_add_layer(self.id, in_norm, post_norm, k_buf, v_buf, attention.descriptors[0])
        self.num_layers += 1
        return self.num_layers - 1

    def add_linear(self, layer: int, which: int, linear: NativeKernel) -> None:
        self._keep.append(linear)
        for address in linear.descriptors:
            self._ops.native_plan_add_segment(self.id, layer, which, address)

    def check(self) -> int:
        """Validates the finished plan (raises RuntimeError naming what is wrong); its max rows."""
        return int(self._ops.native_plan_check(self.id))

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, loc: torch.Tensor,
             table: torch.Tensor, rows: torch.Tensor, lens: torch.Tensor, shared_rows: bool = False) -> torch.Tensor:
        """As DecodePlan.step: h [B, hidden] embeddings -> hidden [B, hidden] after the final norm.
        ``shared_rows``: rows may be positions of one sequence (a speculative verify), so every
        row's K/V is written before any row's attention reads the pool."""
        return self._ops.native_step(self.id, h, cos, sin, loc, table, rows, lens, shared_rows)
