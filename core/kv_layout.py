"""KVLayout: what the KV pool stores per token and layer. It belongs to the model.

A model may declare ``kv_layout() -> KVLayout`` (kvyard.model_base); one that does not gets
``KVLayout.mha`` from its config's head counts. The runner sizes and allocates the pool from the
layout (mem_cache/kv_pool.py) and hands it to the attention backend in ``AttentionConfig``; a
backend lists the layout kinds it serves in ``AttentionBackend.kv_layouts`` and refuses any
other by name when it is built.

Kinds:
  "mha"  K and V per KV head: k [S, Hkv, D], v [S, Hkv, Dv] (Dv = D for every model so far).
  "mla"  multi-head latent attention (DeepSeek-V2/V3): one shared "head" per token holding the
         compressed latent then the rotated rope part, [S, 1, kv_lora_rank + qk_rope_head_dim].
         There is no V buffer: V is the leading kv_lora_rank columns of that same row, so the
         pool's v_buffer(layer) IS the k buffer. Queries arrive already absorbed into latent
         space ([T, H, kv_lora_rank + qk_rope_head_dim]); the attention output is the
         probability-weighted latent [T, H, kv_lora_rank], which the model expands per head.

Invariant for every kind: the value of a stored token is the leading ``v_head_dim`` columns of
``v_buffer(layer)[slot]``; a backend whose V buffer is wider keeps only those output columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("mha", "mla")


@dataclass(frozen=True)
class KVLayout:
    kind: str
    num_layers: int
    num_kv_heads: int      # stored heads per token (mla: 1, the shared latent)
    head_dim: int          # K width per stored head (mla: kv_lora_rank + qk_rope_head_dim)
    v_head_dim: int        # V width (mla: kv_lora_rank, the leading columns of the K row)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kv_layout.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"kv_layout.{name} must be positive, got {getattr(self, name)}")
        if self.kind == "mla" and (self.num_kv_heads != 1 or self.v_head_dim >= self.head_dim):
            raise ValueError("kv_layout: mla stores one latent head whose value part is a strict "
                             f"prefix of it, got {self.num_kv_heads} heads, v {self.v_head_dim} "
                             f"of {self.head_dim}")

    @classmethod
    def mha(cls, num_layers: int, num_kv_heads: int, head_dim: int) -> "KVLayout":
        return cls("mha", num_layers, num_kv_heads, head_dim, head_dim)

    @classmethod
    def mla(cls, num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int) -> "KVLayout":
        return cls("mla", num_layers, 1, kv_lora_rank + qk_rope_head_dim, kv_lora_rank)

    @property
    def separate_v(self) -> bool:
        """Whether V has buffers of its own (mha) or is read out of the K row (mla)."""
        return self.kind == "mha"

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Pool bytes one token takes over all layers."""
        width = self.num_kv_heads * (self.head_dim + (self.v_head_dim if self.separate_v else 0))
        return self.num_layers * width * torch.empty((), dtype=dtype).element_size()

    def describe(self) -> str:
        if self.kind == "mla":
            return (f"mla: latent {self.v_head_dim} + rope {self.head_dim - self.v_head_dim} "
                    f"per token, {self.num_layers} layers")
        return f"mha: {self.num_kv_heads} kv heads x {self.head_dim}, {self.num_layers} layers"
