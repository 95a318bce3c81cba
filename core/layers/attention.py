"""Attention layer: holds the per-layer facts and hands the work to the selected backend.

Per-layer facts a backend reads: heads, head_dim, ``scaling`` (the score multiplier),
``sliding_window`` (None: full causal; W: a query at position p sees keys p - W < j <= p) and
``logit_cap`` (None, or c > 0: scores become c * tanh(score / c) before masking). Models whose
layers differ (Gemma's alternating local / global layers) give each layer its own values.
"""
from __future__ import annotations

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scaling: float | None = None, sliding_window: int | None = None,
                 logit_cap: float | None = None, v_head_dim: int | None = None):
        """``v_head_dim``: the width of each head's output (default head_dim; MLA: the latent)."""
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        if sliding_window is not None and sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        if logit_cap is not None and logit_cap <= 0:
            raise ValueError(f"logit_cap must be positive, got {logit_cap}")
        self.sliding_window = sliding_window or None
        self.logit_cap = logit_cap or None
        self.v_head_dim = v_head_dim or head_dim

        # fp8 KV-cache scales the checkpoint ships (None: not given); the pool takes them
        self.k_scale: float | None = None
        self.v_scale: float | None = None

    def load_kv_scale(self, which: str, tensor: torch.Tensor) -> None:
        """Checkpoint ``...self_attn.k_scale`` / ``v_scale`` (a scalar): which is "k" or "v"."""
        setattr(self, f"{which}_scale", float(tensor.float().reshape(-1).max()))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                fb: ForwardBatch) -> torch.Tensor:
        """q [T, H*D], k [T, Hkv*D], v [T, Hkv*Dv] (None where the KV layout keeps V in the K
        row) -> [T, H*Dv]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        if v is not None:
            v = v.view(t, self.num_kv_heads, self.v_head_dim)
        return fb.attn_backend.forward(q, k, v, self, fb)

    def forward_rotary(self, qk: torch.Tensor, v: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                       fb: ForwardBatch) -> torch.Tensor:
        """qk [T, (H + Hkv) * D] (the [q | k] columns of a fused qkv output), v [T, Hkv * D]:
        RotaryEmbedding.apply on q and k, then attention -> [T, H * D]. Where the KV pool can
        (KVPool.store_rotated), the rotated keys and v reach the cache in the rotary's own launch
        and the backend is told the KV is saved; else the backend's forward saves it."""
        t = qk.shape[0]
        heads = qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        rotated = fb.kv_pool.store_rotated(self.layer_id, fb.out_cache_loc, heads, v, cos_sin)
        stored = rotated is not None
        if not stored:
            rotated = RotaryEmbedding.apply(heads, cos_sin)
        q, k = rotated.split_with_sizes((self.num_heads, self.num_kv_heads), dim=1)
        return fb.attn_backend.forward(q, k, v, self, fb, save_kv_cache=not stored)


def sliding_windows_from_hf(hf_config, num_layers: int) -> list[int | None]:
    """Each layer's sliding window from an HF config: ``layer_types`` ("sliding_attention" /
    "full_attention": Gemma, Qwen2/3 with use_sliding_window) where the config has them, else
    ``sliding_window`` for every layer (Mistral, Phi-3); None where attention is full."""
    window = getattr(hf_config, "sliding_window", None) or None
    types = getattr(hf_config, "layer_types", None)
    if types is None:
        return [window] * num_layers
    if len(types) != num_layers:
        raise ValueError(f"layer_types lists {len(types)} layers, the model has {num_layers}")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"layer_types: {', '.join(unknown)} is not supported "
                         "(supported: sliding_attention, full_attention)")
    if window is None and "sliding_attention" in types:
        raise ValueError("layer_types names sliding_attention layers but sliding_window is not set")
    return [window if t == "sliding_attention" else None for t in types]
