"""KVPool: the per-layer key/value buffers, indexed by slot.

k_buffers[layer] and v_buffers[layer] are [num_slots, Hkv, D]. Slots 0 .. page_size-1 (the
first page) are the dummy page: padded rows write there and nothing reads it back, so it is
never handed out by the allocator. Slot allocation lives in mem_cache/allocator.py.

An fp8 pool (dtype float8_e4m3fn / float8_e5m2) stores k / k_scale and v / v_scale per layer,
saturated to the fp8 range; readers multiply back (attention plugins fold k_scale into the
softmax scale and v_scale into the output). Other pools have scales 1.0 and store k, v as given.
"""
from __future__ import annotations

import torch

from kvyard import cpu_ops
from kvyard.kernels import use_cpu_kernel, use_triton


FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class KVPool:
    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device,
                 scales: tuple[list[float], list[float]] | None = None):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.dtype = dtype
        self.is_fp8 = dtype in FP8_KV_DTYPES
        # per-layer (k, v) scales, python floats so kernels take them without a device sync
        self.k_scales, self.v_scales = scales or ([1.0] * num_layers, [1.0] * num_layers)
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """loc [T] slots; k/v [T, Hkv, D]."""
        if self.is_fp8:
            fmax = torch.finfo(self.dtype).max
            self.k_buffers[layer_id][loc] = (k.float() / self.k_scales[layer_id]).clamp(-fmax, fmax).to(self.dtype)
            self.v_buffers[layer_id][loc] = (v.float() / self.v_scales[layer_id]).clamp(-fmax, fmax).to(self.dtype)
            return
        if use_triton("kv_write", k):
            from kvyard.triton_ops.kv_write import write_kv
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
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
