"""Attention layer: holds the per-layer facts and hands the work to the selected backend."""
from __future__ import annotations

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scaling: float | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        # fp8 KV-cache scales the checkpoint ships (None: not given); the pool takes them
        self.k_scale: float | None = None
        self.v_scale: float | None = None

    def load_kv_scale(self, which: str, tensor: torch.Tensor) -> None:
        """Checkpoint ``...self_attn.k_scale`` / ``v_scale`` (a scalar): which is "k" or "v"."""
        setattr(self, f"{which}_scale", float(tensor.float().reshape(-1).max()))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        return fb.attn_backend.forward(q, k, v, self, fb)
