"""AttentionBackend: the interface every attention plugin implements.

Lifecycle per step:
  1. ModelRunner builds a ForwardBatch and calls ``init_forward_metadata(fb)`` once.
  2. Every attention layer calls ``forward(q, k, v, layer, fb)``: the backend writes the new
     tokens' k/v into the paged pool at ``fb.out_cache_loc`` and attends over
     ``req_to_token[req_pool_indices[i], :seq_lens[i]]``.
Shapes: q [T, H, D], k/v [T, Hkv, D]; the result is [T, H * Dv] in q's dtype (Dv =
layer.v_head_dim; D for every "mha" model).
KV layout (kvyard.kv_layout): the model declares what the pool stores; ``kv_layouts`` lists the
kinds a backend serves and the base constructor refuses any other by name. Under "mla" v is None
(V lives in the K row), the pool's v_buffer is its k buffer, and the result keeps the leading
layer.v_head_dim columns of each head's output.
Invariants: the backend never allocates or frees KV slots; slot 0 of the pool (and row 0 of
req_to_token) is a dummy that padded rows point at, so kernels never branch on padding.

Layer features: a layer may ask for more than plain causal attention (``Attention``'s
``sliding_window``: query at position p sees keys p - W < j <= p; ``logit_cap``: scores become
cap * tanh(score / cap) before the mask and softmax). ``AttentionConfig.features`` names what the
served model's layers need; a backend lists what it serves in ``supported_features`` and the base
constructor refuses the rest by name, so an unsupported model fails at start-up, not mid-run.

Tree-masked extend ("spec_tree" in ``features`` when the server verifies speculative draft
trees): ``forward_extend`` must honour ``fb.spec_tree`` (kvyard.forward_batch.TreeMask) when it
is set: request i's new token r attends the whole prefix and exactly the new tokens c with
``fb.spec_tree.mask(i)[r, c]`` (its ancestors and itself; c <= r always). Positions (RoPE) are
the tree depths the batch carries, so a backend must not derive positions from row indices.
A backend that cannot lists no "spec_tree" and is refused at start-up by name.

CUDA-graph hooks: a backend that supports graphs keeps its metadata in buffers preallocated by
``init_cuda_graph_state`` and refills them in place in ``init_forward_metadata_replay``. Decode
steps (``supports_cuda_graph``) and, with ``supports_extend_graph``, extends of exactly W new
tokens per request (the speculative verify step; kvyard.executor.extend_graph_runner) are
captured: ``init_extend_graph_state(max_bs, W)`` preallocates the extend buffers, and the
capture / replay hooks get a decode or an extend batch (``fb.mode`` tells which). An extend
batch there has W new tokens per request and per-request prefix lengths that change from replay
to replay (``fb.extend_prefix_lens_cpu``, ``fb.seq_lens``); the replay hook refills them outside
the graph.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

import torch

from kvyard.kv_layout import KVLayout

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.kernels.native import NativeKernel
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
    # what the model's attention layers need beyond causal attention (LAYER_FEATURES)
    features: frozenset = frozenset()
    # what the pool stores per token (None: "mha" from num_kv_heads / head_dim)
    kv_layout: Optional[KVLayout] = None

    @property
    def kv_layout_kind(self) -> str:
        return self.kv_layout.kind if self.kv_layout is not None else "mha"


# name -> what it means, for error messages
LAYER_FEATURES = {"sliding_window": "sliding-window attention",
                  "logit_cap": "attention logit soft-capping",
                  "spec_tree": "tree-masked verify of speculative draft trees"}


def layer_features(layers: Iterable["Attention"]) -> frozenset:
    """The LAYER_FEATURES that any of ``layers`` needs."""
    needed = set()
    for layer in layers:
        if getattr(layer, "sliding_window", None):
            needed.add("sliding_window")
        if getattr(layer, "logit_cap", None):
            needed.add("logit_cap")
    return frozenset(needed)


class AttentionBackend(ABC):
    name: str = "base"
    supports_cuda_graph: bool = False
    supports_extend_graph: bool = False   # extends of W tokens per request captured too
    supports_fp8_kv: bool = False   # reads an fp8 KV pool (multiplying back its per-layer scales)
    supported_features: frozenset = frozenset()   # of LAYER_FEATURES
    kv_layouts: tuple[str, ...] = ("mha",)   # KV layout kinds served (kvyard.kv_layout)

    def __init__(self, config: AttentionConfig):
        check_serves_layout(type(self), config)
        missing = self.missing_features(config.features)
        if missing == ["spec_tree"]:
            raise ValueError(f"attention backend {self.name!r}: {LAYER_FEATURES['spec_tree']} is not supported "
                             f"yet; choose another --attention-backend (torch_native, triton, flex_attention) "
                             f"or chain drafts")
        if missing:
            raise ValueError(f"attention backend {self.name!r} does not support "
                             f"{' or '.join(LAYER_FEATURES[f] for f in missing)}, which this model "
                             f"needs; choose another --attention-backend")
        if {"spec_tree", "sliding_window"} <= config.features:
            raise ValueError("speculative tree drafts with sliding-window layers are not supported yet "
                             "(the window counts verify rows, not tree depths); use chain drafts")
        self.config = config

    @classmethod
    def missing_features(cls, needed: Iterable[str]) -> list[str]:
        """The needed layer features this backend cannot serve, sorted."""
        return sorted(set(needed) - set(cls.supported_features))

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

    def lower_decode(self, layer: "Attention", kv_pool) -> Optional[tuple[str, tuple]]:
        """``forward_decode`` of ``layer`` (after the KV write) as one dispatcher call
        ("namespace::op", args), run as ``op(q [B, H, D] contiguous, k_buf, v_buf, req_to_token,
        req_pool_indices, seq_lens, *args) -> [B, H, Dv]`` with the same results; None: the
        backend cannot, and the model keeps its Python decode step (kvyard.kernels.decode_loop)."""
        return None

    def lower_decode_native(self, layer: "Attention", kv_pool) -> Optional["NativeKernel"]:
        """``lower_decode``'s call as one kvyard_native.h attention descriptor over the layer's
        pools (kvyard.kernels.native), bitwise equal to it; None: not available."""
        return None

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """Causal attention of the new tokens over prefix + new tokens, per request."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """One query token per request over its whole KV."""

    # -- CUDA-graph hooks ---------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int) -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    def init_extend_graph_state(self, max_bs: int, tokens_per_req: int) -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs of extend steps")

    def init_forward_metadata_capture(self, fb: "ForwardBatch") -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    def init_forward_metadata_replay(self, fb: "ForwardBatch") -> None:
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")


def check_serves_layout(backend_cls: type, config: AttentionConfig) -> None:
    """A one-line error naming the backend and the layout when ``backend_cls`` cannot serve the
    model's KV layout."""
    kind = config.kv_layout_kind
    served = getattr(backend_cls, "kv_layouts", ("mha",))
    if kind not in served:
        raise ValueError(f"attention_backend: {getattr(backend_cls, 'name', backend_cls.__name__)!r} "
                         f"does not serve the {kind!r} KV layout this model declares "
                         f"({config.kv_layout.describe() if config.kv_layout else kind}); it serves: "
                         f"{', '.join(served)}")


def value_columns(out: torch.Tensor, layer: "Attention") -> torch.Tensor:
    """A backend's per-head output [T, H, D] -> the layer's result [T, H * Dv]: every column
    under "mha" (Dv = D), the leading layer.v_head_dim ones (the weighted latent) under "mla",
    where attention ran over the whole latent + rope row because V is read out of it."""
    t, heads, dim = out.shape
    if layer.v_head_dim == dim:
        return out.reshape(t, heads * dim)
    return out[..., :layer.v_head_dim].reshape(t, heads * layer.v_head_dim)
