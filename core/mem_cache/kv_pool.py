"""KVPool: the per-layer key/value buffers, indexed by slot.

The model's KVLayout (kvyard.kv_layout) says what a slot holds. "mha": k_buffers[layer] and
v_buffers[layer] are [num_slots, Hkv, D]. "mla": k_buffers[layer] is [num_slots, 1, latent +
rope] and v_buffers[layer] is the same tensor (V is its leading latent columns), so a token is
stored once. Slots 0 .. page_size-1 (the first page) are the dummy page: padded rows write there
and nothing reads it back, so it is never handed out by the allocator. Slot allocation lives in
mem_cache/allocator.py.

An fp8 pool (dtype float8_e4m3fn / float8_e5m2) stores k / k_scale and v / v_scale per layer,
saturated to the fp8 range; readers multiply back (attention plugins fold k_scale into the
softmax scale and v_scale into the output). Other pools have scales 1.0 and store k, v as given.

On the CPU the buffers are zero pages the kernel maps on first write (calloc'd through numpy),
so the pool's resident memory is the tokens stored so far, not its size; reads see zeros either way.
"""
from __future__ import annotations

import math

import torch

from kvyard.kernels import cpu_ops
from kvyard.kernels import use_cpu_kernel, use_triton
from kvyard.kv_layout import KVLayout


FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """torch.zeros, except that on the CPU the pages stay unmapped until written: numpy's zeros
    is calloc, which for a large block maps fresh zero pages instead of writing them."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVPool:
    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device, layout: KVLayout | None = None,
                 scales: tuple[list[float], list[float]] | None = None):
        layout = layout or KVLayout.mha(num_layers, num_kv_heads, head_dim)
        if (layout.num_layers, layout.num_kv_heads, layout.head_dim) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(f"kv_layout ({layout.describe()}) disagrees with the pool's shape "
                             f"({num_layers} layers, {num_kv_heads} heads x {head_dim})")
        self.layout = layout
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.dtype = dtype
        self.is_fp8 = dtype in FP8_KV_DTYPES
        # per-layer (k, v) scales, python floats so kernels take them without a device sync
        self.k_scales, self.v_scales = scales or ([1.0] * num_layers, [1.0] * num_layers)
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        if layout.separate_v:
            v_shape = (num_slots, num_kv_heads, layout.v_head_dim)
            self.v_buffers = [_zeros(v_shape, dtype, device) for _ in range(num_layers)]
        else:
            self.v_buffers = self.k_buffers   # V is read out of the K row (kv_layout.py)

    @classmethod
    def for_layout(cls, num_slots: int, layout: KVLayout, dtype: torch.dtype, device: str | torch.device,
                   scales: tuple[list[float], list[float]] | None = None) -> "KVPool":
        return cls(num_slots, layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype, device, layout,
                   scales)

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """loc [T] slots; k [T, Hkv, D], v [T, Hkv, Dv], or None where the layout keeps V inside
        the K row (mla)."""
        if self.is_fp8 and (v is None or not self.layout.separate_v):
            raise ValueError(f"an fp8 KV cache is not supported with the {self.layout.kind} KV layout")
        if v is None:
            if self.layout.separate_v:
                raise ValueError(f"set_kv: the {self.layout.kind} KV layout needs v")
            self.k_buffers[layer_id][loc] = k.to(self.dtype)
            return
        if use_triton("kv_write", k):          # one launch (fp8: scaled, bit-identical to below)
            from kvyard.kernels.triton_ops.kv_write import write_kv
            write_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], loc, k, v,
                     self.k_scales[layer_id], self.v_scales[layer_id])
            return
        if self.is_fp8:
            fmax = torch.finfo(self.dtype).max
            # times the reciprocal, not / scale: torch divides by a Python number differently on
            # the CPU (true division) and CUDA (reciprocal product); the product is one value everywhere
            self.k_buffers[layer_id][loc] = (k.float() * (1.0 / self.k_scales[layer_id])).clamp(-fmax, fmax).to(self.dtype)
            self.v_buffers[layer_id][loc] = (v.float() * (1.0 / self.v_scales[layer_id])).clamp(-fmax, fmax).to(self.dtype)
            return
        if k.dtype == self.dtype and loc.dtype == torch.int64 and use_cpu_kernel("kv_write", k):
            cpu_ops.write_kv(self.k_buffers[layer_id], self.v_buffers[layer_id], loc, k, v)
            return
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)

    def store_rotated(self, layer_id: int, loc: torch.Tensor, qk: torch.Tensor, v: torch.Tensor,
                      cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The rotary embedding of qk [T, Hq + Hkv, D] ([q | k] heads, RotaryEmbedding.apply's
        rotate-half form) with the rotated keys and v [T, Hkv, D] stored at slots loc [T] in the
        same launch (triton_ops.rotary.rotate_and_store: set_kv's casts and fp8 scaling) -> the
        rotated qk. None where that kernel does not serve (the Triton rotary or KV-write op off,
        a layout that keeps V in the K row): the caller rotates, then set_kv."""
        if not (self.layout.separate_v and use_triton("rotary", qk) and use_triton("kv_write", qk)):
            return None
        from kvyard.kernels.triton_ops.rotary import rotate_and_store
        cos, sin = cos_sin
        return rotate_and_store(qk, cos, sin, v, loc, self.k_buffers[layer_id], self.v_buffers[layer_id],
                                self.k_scales[layer_id], self.v_scales[layer_id])

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """The KV of slots ``src`` [N] copied to slots ``dst`` [N], every layer (speculative tree
        verify keeps the accepted path's KV contiguous in the request's rows). Reads all sources
        before writing, so a slot may be both a source and a target."""
        src, dst = src.to(self.k_buffers[0].device), dst.to(self.k_buffers[0].device)
        buffers = self.k_buffers + (self.v_buffers if self.layout.separate_v else [])
        for buf in buffers:
            buf[dst] = buf[src]

    def k_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffers[layer_id]

    def v_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffers[layer_id]

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes per token of an mha pool (KVLayout.bytes_per_token for any layout)."""
        return KVLayout.mha(num_layers, num_kv_heads, head_dim).bytes_per_token(dtype)
