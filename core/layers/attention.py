"""Attention layer: holds the per-layer facts and hands the work to the selected backend."""
from __future__ import annotations

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scaling: float | None = None, v_head_dim: int | None = None):
        """``v_head_dim``: the width of each head's output (default head_dim; MLA: the latent)."""
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        self.v_head_dim = v_head_dim or head_dim

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
