"""Qwen3: the Llama-family graph with an RMSNorm over each head of q and of k before rope.

    q, k, v = qkv_proj(x)                        [T, H*D], [T, Hkv*D], [T, Hkv*D]
    q = q_norm(q as [T, H, D]); k = k_norm(k as [T, Hkv, D])   (weights [D], shared by heads)
    q, k rotated, attention, o_proj              as in llama_model.py

Everything else (biases from ``attention_bias``, tied embeddings, per-layer sliding windows from
``layer_types``) is the Llama family's.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RotaryEmbedding
from kvyard.layers.weights import copy_checked
from kvyard.model_base import ModelBuildContext
from kvyard_plugins.models.llama_model import LlamaAttention, LlamaDims, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, dims: LlamaDims, layer_id: int, ctx: ModelBuildContext, prefix: str,
                 sliding_window: Optional[int] = None):
        super().__init__(dims, layer_id, ctx, prefix, sliding_window)
        self.q_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps, ctx.dtype, ctx.device)
        self.k_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps, ctx.dtype, ctx.device)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split_with_sizes((self.q_size, self.kv_size, self.kv_size), dim=1)
        q = RotaryEmbedding.apply(self.q_norm(q.reshape(t, self.num_heads, self.head_dim)), cos_sin)
        k = RotaryEmbedding.apply(self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim)), cos_sin)
        return self.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v, fb))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention

    def _layer_targets(self, prefix: str, layer):
        targets, optional = super()._layer_targets(prefix, layer)
        for name in ("q_norm", "k_norm"):
            full = f"{prefix}.self_attn.{name}.weight"
            targets[full] = partial(copy_checked, getattr(layer.self_attn, name).weight, name=full)
        return targets, optional
