"""GatedMLP: down(silu(gate(x)) * up(x)) with a fused gate_up projection.

The dense MLP of MoE models' dense layers and their shared experts. ``targets(prefix)`` maps the
HF checkpoint names (gate_proj / up_proj / down_proj) to the calls that load them.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from kvyard.layers.activation import SiluAndMul
from kvyard.layers.linear import Linear
from kvyard.layers.parallel import ColumnParallel, RowParallel


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, ctx: Any, prefix: str):
        """ctx: a kvyard.model_base.ModelBuildContext (dtype, device, quantization, tp: gate/up
        column-parallel, down row-parallel)."""
        super().__init__()
        lin = dict(dtype=ctx.dtype, device=ctx.device)
        self.gate_up_proj = Linear(hidden, [inter, inter], method=ctx.linear_method(f"{prefix}.gate_up_proj"),
                                   prefix=f"{prefix}.gate_up_proj", parallel=ColumnParallel(ctx.tp), **lin)
        self.down_proj = Linear(inter, hidden, method=ctx.linear_method(f"{prefix}.down_proj"),
                                prefix=f"{prefix}.down_proj", parallel=RowParallel(ctx.tp), **lin)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        return self.down_proj(self.act(self.gate_up_proj(x)))

    def targets(self, prefix: str) -> dict[str, Callable[[Any], None]]:
        return {f"{prefix}.gate_proj.weight": partial(self.gate_up_proj.load_shard, 0),
                f"{prefix}.up_proj.weight": partial(self.gate_up_proj.load_shard, 1),
                f"{prefix}.down_proj.weight": partial(self.down_proj.load_shard, 0)}
