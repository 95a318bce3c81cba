"""Phi-3: the Llama-family graph with checkpoint-fused projections and LongRoPE.

The checkpoint stores ``self_attn.qkv_proj`` ([q | k | v] rows) and ``mlp.gate_up_proj``
([gate | up] rows) as one tensor each; they load into the same fused Linear layers the Llama
graph builds (split into its shards on load). Rope "longrope" (the "su" scaling of the first
Phi-3 releases) is kvyard.layers.rotary's; ``sliding_window`` applies to every layer, as in HF.
No projection has a bias.
"""
from __future__ import annotations

from typing import Any, Callable

from kvyard.layers.linear import Linear
from kvyard.layers.weights import as_dense
from kvyard_plugins.models.llama_model import LlamaForCausalLM


def load_fused(linear: Linear, name: str, weight: Any) -> None:
    """A checkpoint tensor holding all of ``linear``'s shards stacked by rows [sum(out), in]."""
    dense = as_dense(weight, name)
    full = linear.full_output_sizes   # the layer keeps its tensor-parallel slice of each shard
    if dense.shape[0] != sum(full):
        raise ValueError(f"{name}: checkpoint rows {dense.shape[0]} do not match the model's "
                         f"{sum(full)}")
    for shard, rows in enumerate(dense.split(full, dim=0)):
        linear.load_shard(shard, rows)


class Phi3ForCausalLM(LlamaForCausalLM):
    supports_pipeline_parallel = False   # its checkpoint targets assume every layer is built

    @classmethod
    def biases(cls, cfg: Any) -> tuple[bool, bool, bool]:
        return False, False, False

    def _layer_targets(self, prefix: str, layer):
        targets, optional = super()._layer_targets(prefix, layer)
        fused = {f"{prefix}.self_attn.qkv_proj.weight": layer.self_attn.qkv_proj,
                 f"{prefix}.mlp.gate_up_proj.weight": layer.mlp.gate_up_proj}
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            del targets[f"{prefix}.{part}.weight"]
        for name, linear in fused.items():
            targets[name] = lambda w, linear=linear, name=name: load_fused(linear, name, w)
        return targets, optional
