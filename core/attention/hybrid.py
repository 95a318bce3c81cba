"""Hybrid attention: extend steps on one backend, decode steps on another.

Selected with --prefill-attention-backend / --decode-attention-backend (each defaults to
--attention-backend). Every step is one mode, so exactly one of the two backends sees it: its
``init_forward_metadata`` fills ``fb.attn_metadata`` and its ``forward`` (the k/v write included)
runs every layer. Both read and write the same paged pool, so a prefix written by the prefill
backend is read by the decode backend with no copy. CUDA graphs capture decode only, so the
hybrid supports them exactly when its decode backend does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvyard.attention import AttentionBackend, AttentionConfig
from kvyard.kv_layout import KINDS
from kvyard.plugins import registry

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention


class HybridAttentionBackend(AttentionBackend):
    name = "hybrid"
    kv_layouts = KINDS   # each part checks the layout itself when it is built

    def __init__(self, config: AttentionConfig, prefill: AttentionBackend, decode: AttentionBackend):
        # no base-class feature check: both parts were built from ``config`` and checked it
        self.config = config
        self.prefill = prefill
        self.decode = decode
        self.supports_cuda_graph = decode.supports_cuda_graph
        self.supports_extend_graph = prefill.supports_extend_graph

    def _for(self, fb: "ForwardBatch") -> AttentionBackend:
        return self.decode if fb.mode.is_decode() else self.prefill

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        self._for(fb).init_forward_metadata(fb)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "Attention",
                fb: "ForwardBatch", save_kv_cache: bool = True) -> torch.Tensor:
        return self._for(fb).forward(q, k, v, layer, fb, save_kv_cache)

    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        return self.prefill.forward_extend(q, layer, fb)

    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        return self.decode.forward_decode(q, layer, fb)

    def lower_decode(self, layer: "Attention", kv_pool):
        return self.decode.lower_decode(layer, kv_pool)

    def lower_decode_native(self, layer: "Attention", kv_pool):
        return self.decode.lower_decode_native(layer, kv_pool)

    # -- CUDA-graph hooks: decode graphs on the decode backend, extend graphs on the prefill one
    def init_cuda_graph_state(self, max_bs: int) -> None:
        self.decode.init_cuda_graph_state(max_bs)

    def init_extend_graph_state(self, max_bs: int, tokens_per_req: int) -> None:
        self.prefill.init_extend_graph_state(max_bs, tokens_per_req)

    def init_forward_metadata_capture(self, fb: "ForwardBatch") -> None:
        self._for(fb).init_forward_metadata_capture(fb)

    def init_forward_metadata_replay(self, fb: "ForwardBatch") -> None:
        self._for(fb).init_forward_metadata_replay(fb)


def build_attention_backend(config: AttentionConfig, prefill_name: str,
                            decode_name: str) -> tuple[AttentionBackend, str]:
    """(backend, name to report): one plugin when both names agree, else the hybrid of two."""
    reg = registry("attention_backends")
    if prefill_name == decode_name:
        return reg.get(prefill_name)(config), prefill_name
    backend = HybridAttentionBackend(config, reg.get(prefill_name)(config), reg.get(decode_name)(config))
    return backend, f"hybrid(prefill={prefill_name}, decode={decode_name})"
