"""Which Linear layers of a model take LoRA, and the PEFT module name of each of their shards.

A Linear whose prefix is ``<...>layers.<i>.<block>.<name>`` serves PEFT's module names by shard:
``qkv_proj`` -> q_proj, k_proj, v_proj; ``gate_up_proj`` -> gate_proj, up_proj; a plain
``o_proj`` / ``down_proj`` (or unfused q/k/v/gate/up) -> itself. Other linears (lm_head, MoE
routers and experts, MLA projections) take no LoRA.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kvyard.layers.linear import Linear
from kvyard.lora.config import FUSED_ALIASES, TARGET_MODULES

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LoRATarget:
    """One Linear that takes LoRA. ``shard_modules[k]`` is the PEFT name of its shard k."""
    key: str                       # the Linear's prefix, e.g. model.layers.0.self_attn.qkv_proj
    layer: Linear
    layer_id: int
    shard_modules: tuple[str, ...]

    def peft_name(self, shard: int) -> str:
        """The adapter's module path of shard k (e.g. model.layers.0.self_attn.q_proj)."""
        return self.key.rsplit(".", 1)[0] + "." + self.shard_modules[shard]


def find_targets(model: nn.Module, modules: tuple[str, ...]) -> dict[str, LoRATarget]:
    """{prefix: LoRATarget} for every Linear serving at least one of ``modules``."""
    out = {}
    for linear in model.modules():
        if not isinstance(linear, Linear):
            continue
        m = _LAYER.search(linear.prefix)
        name = linear.prefix.rsplit(".", 1)[-1]
        shards = FUSED_ALIASES.get(name, (name,))
        if m is None or ".experts." in linear.prefix or len(shards) != len(linear.output_sizes) or not set(shards) <= set(TARGET_MODULES):
            continue
        if set(shards) & set(modules):
            out[linear.prefix] = LoRATarget(linear.prefix, linear, int(m.group(1)), shards)
    return out


def targets_by_peft_name(targets: dict[str, LoRATarget]) -> dict[str, tuple[LoRATarget, int]]:
    """{PEFT module path: (target, shard)}."""
    return {t.peft_name(k): (t, k) for t in targets.values() for k in range(len(t.shard_modules))}
