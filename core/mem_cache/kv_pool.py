"""KVPool: the per-layer key/value buffers, indexed by slot.

The model's KVLayout (kvyard.kv_layout) says what a slot holds. "mha": k_buffers[layer] and
v_buffers[layer] are [num_slots, Hkv, D]. "mla": k_buffers[layer] is [num_slots, 1, latent +
rope] and v_buffers[layer] is the same tensor (V is its leading latent columns), so a token is
stored once. Slots 0 .. page_size-1 (the first page) are the dummy page: padded rows write there
and nothing reads it back, so it is never handed out by the allocator. Slot allocation lives in
mem_cache/allocator.py.
"""
from __future__ import annotations

import torch

from kvyard.kernels import cpu_ops
from kvyard.kernels import use_cpu_kernel, use_triton
from kvyard.kv_layout import KVLayout


class KVPool:
    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device, layout: KVLayout | None = None):
        layout = layout or KVLayout.mha(num_layers, num_kv_heads, head_dim)
        if (layout.num_layers, layout.num_kv_heads, layout.head_dim) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(f"kv_layout ({layout.describe()}) disagrees with the pool's shape "
                             f"({num_layers} layers, {num_kv_heads} heads x {head_dim})")
        self.layout = layout
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.dtype = dtype
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        if layout.separate_v:
            v_shape = (num_slots, num_kv_heads, layout.v_head_dim)
            self.v_buffers = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        else:
            self.v_buffers = self.k_buffers   # V is read out of the K row (kv_layout.py)

    @classmethod
    def for_layout(cls, num_slots: int, layout: KVLayout, dtype: torch.dtype,
                   device: str | torch.device) -> "KVPool":
        return cls(num_slots, layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype, device, layout)

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """loc [T] slots; k [T, Hkv, D], v [T, Hkv, Dv], or None where the layout keeps V inside
        the K row (mla)."""
        if v is None:
            if self.layout.separate_v:
                raise ValueError(f"set_kv: the {self.layout.kind} KV layout needs v")
            self.k_buffers[layer_id][loc] = k.to(self.dtype)
            return
        if use_triton("kv_write", k):
            from kvyard.kernels.triton_ops.kv_write import write_kv
            write_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], loc, k, v)
            return
        if k.dtype == self.dtype and loc.dtype == torch.int64 and use_cpu_kernel("kv_write", k):
            cpu_ops.write_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], loc, k, v)
            return
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)

    def k_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffers[layer_id]

    def v_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffers[layer_id]

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes per token of an mha pool (KVLayout.bytes_per_token for any layout)."""
        return KVLayout.mha(num_layers, num_kv_heads, head_dim).bytes_per_token(dtype)
