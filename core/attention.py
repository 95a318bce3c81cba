"""AttentionBackend: the interface every attention plugin implements.

Lifecycle per step:
  1. ModelRunner builds a ForwardBatch and calls ``init_forward_metadata(fb)`` once.
  2. Every attention layer calls ``forward(q, k, v, layer, fb)``: the backend writes the new
     tokens' k/v into the paged pool at ``fb.out_cache_loc`` and attends over
     ``req_to_token[req_pool_indices[i], :seq_lens[i]]``.
Shapes: q [T, H, D], k/v [T, Hkv, D]; the result is [T, H * D] in q's dtype.
Invariants: the backend never allocates or frees KV slots; slot 0 of the pool (and row 0 of
req_to_token) is a dummy that padded rows point at, so kernels never branch on padding.

CUDA-graph hooks: a backend that supports graphs keeps its metadata in buffers preallocated by
``init_cuda_graph_state`` and refills them in place in ``init_forward_metadata_replay``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int         # query heads on this rank
    num_kv_heads: int      # kv heads on this rank
    head_dim: int
    dtype: torch.dtype     # activation / KV dtype
    device: str
    page_size: int
    max_context_len: int
    max_batch_size: int
    # backend-specific settings from ServerArgs, keyed by flag name without dashes
    # (e.g. "triton_attention_num_kv_splits"); a backend reads the keys it knows
    options: dict = field(default_factory=dict)


class AttentionBackend(ABC):
    name: str = "base"
    supports_cuda_graph: bool = False
    supports_fp8_kv: bool = False   # reads an fp8 KV pool (multiplying back its per-layer scales)

    def __init__(self, config: AttentionConfig):
        self.config = config

    @classmethod
    def is_available(cls, device: str) -> bool:
        """Whether this backend can run on ``device`` in this environment (its library is
        installed, the device exists). "auto" skips backends that cannot; selecting one by name
        still reaches the constructor, which explains what is missing."""
        return True

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        """Per-step precomputation shared by all layers (index tensors, kernel plans)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer: "Attention", fb: "ForwardBatch", save_kv_cache: bool = True) -> torch.Tensor:
        if save_kv_cache:
            fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, k, v)
        if fb.mode.is_decode():
            return self.forward_decode(q, layer, fb)
        return self.forward_extend(q, layer, fb)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, per request."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """One query token per request over its whole KV."""

    # -- CUDA-graph hooks (decode only) -----------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int) -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    def init_forward_metadata_capture(self, fb: "ForwardBatch") -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    def init_forward_metadata_replay(self, fb: "ForwardBatch") -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")
