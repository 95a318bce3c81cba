"""flashinfer: the flashinfer-python library's paged-KV attention kernels (CUDA only).

The pool is used in place: per layer k/v [num_slots, Hkv, D] viewed as flashinfer's NHD pages
[num_pages, page_size, Hkv, D], with a page table built per step from req_to_token
(flashinfer_index.py). One plan per step, shared by every layer:
  extend  BatchPrefillWithPagedKVCacheWrapper, causal; flashinfer aligns each request's queries
          to the end of its KV, so new tokens see the cached prefix and each other causally.
  decode  BatchDecodeWithPagedKVCacheWrapper (tensor-core variant for large GQA groups).
Both plan with the softmax scale head_dim ** -0.5; a layer with another scale passes the ratio
as flashinfer's q_scale (a kernel scalar, no extra pass over q).

CUDA graphs (decode): init_cuda_graph_state allocates the page-table buffers once for the largest
batch; each captured batch size gets its own graph-mode decode wrapper whose kernels read those
buffers, and init_forward_metadata_replay re-plans it (host-side work and copies into the same
buffers) before the graph replays. Padded rows (req_to_token row 0, seq_len 1) read dummy page 0.
CUDA graphs (extend of W tokens per request, the speculative verify step): the same with
init_extend_graph_state, buffers of their own (qo_indptr = i * W fixed, the page table refilled)
and a graph-mode prefill wrapper per captured batch size, causal as in eager extends.

Options (AttentionConfig.options):
  flashinfer_prefill_backend     fa2 (default) | fa3 | auto   the library's extend kernels
  flashinfer_decode_tensor_cores None (default: when H / Hkv >= 4) | True | False
  flashinfer_workspace_mb        float workspace of the split-KV kernels (default 384)
flashinfer is imported by the constructor, never at module import; without the library or a
CUDA device the constructor fails with one line (UNAVAILABLE).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

import torch

from kvyard.attention import AttentionBackend, AttentionConfig
from kvyard_plugins.attention.flashinfer_index import PagedKVIndex, build_paged_kv_index, paged_view, qo_indptr

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention

UNAVAILABLE = "attention backend 'flashinfer' needs the flashinfer-python package and a CUDA device"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
PREFILL_BACKENDS = ("fa2", "fa3", "auto")
TENSOR_CORE_MIN_GROUP = 4     # GQA group from which the tensor-core decode kernel wins


def load_flashinfer(device: str) -> ModuleType:
    """The flashinfer module, or ValueError(UNAVAILABLE + the reason) in one line."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"{UNAVAILABLE}; the device is {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"{UNAVAILABLE}; torch sees no CUDA device")
    try:
        import flashinfer
    except Exception as exc:  # ImportError, or a broken install failing inside its import
        first_line = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{UNAVAILABLE}; importing it failed: {type(exc).__name__}: {first_line}") from exc
    return flashinfer


@dataclass(frozen=True)
class FlashInferOptions:
    prefill_backend: str = "fa2"
    decode_tensor_cores: Optional[bool] = None
    workspace_mb: int = 384

    @classmethod
    def from_options(cls, options: dict) -> "FlashInferOptions":
        backend = options.get("flashinfer_prefill_backend")
        backend = cls.prefill_backend if backend is None else backend
        if backend not in PREFILL_BACKENDS:
            raise ValueError(f"flashinfer_prefill_backend must be one of {', '.join(PREFILL_BACKENDS)}, "
                             f"got {backend!r}")
        tensor_cores = options.get("flashinfer_decode_tensor_cores")
        if tensor_cores is not None and not isinstance(tensor_cores, bool):
            raise ValueError(f"flashinfer_decode_tensor_cores must be true, false or unset, got {tensor_cores!r}")
        workspace = options.get("flashinfer_workspace_mb")
        workspace = cls.workspace_mb if workspace is None else workspace
        if not isinstance(workspace, int) or isinstance(workspace, bool) or workspace < 1:
            raise ValueError(f"flashinfer_workspace_mb must be an integer >= 1, got {workspace!r}")
        return cls(backend, tensor_cores, workspace)


def check_config(config: AttentionConfig) -> None:
    """What the library's kernels accept, checked before anything is allocated."""
    if config.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: attention backend 'flashinfer' runs float16 or bfloat16, got "
                         f"{config.dtype}; use another backend (triton, torch_native) for it")
    if config.head_dim % 16 or not 64 <= config.head_dim <= 256:
        raise ValueError(f"head_dim: attention backend 'flashinfer' needs a multiple of 16 in "
                         f"64..256, got {config.head_dim}")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_heads ({config.num_heads}) must be a multiple of num_kv_heads "
                         f"({config.num_kv_heads})")


@dataclass
class FlashInferMetadata:
    wrapper: Any                 # the planned flashinfer wrapper every layer of the step runs
    index: PagedKVIndex


@dataclass
class GraphBuffers:
    """Page-table buffers of the captured decode (or extend) graphs, sized for the largest batch."""
    kv_indptr: torch.Tensor          # [max_bs + 1] int32
    kv_indices: torch.Tensor         # [max_bs * pages of the longest context] int32
    kv_last_page_len: torch.Tensor   # [max_bs] int32
    qo_indptr: Optional[torch.Tensor] = None   # extend graphs: [max_bs + 1] int32, i * W

    @classmethod
    def allocate(cls, max_bs: int, config: AttentionConfig, tokens_per_req: int = 0) -> "GraphBuffers":
        # an extend graph's padded rows may reach tokens_per_req past the context
        max_pages = max_bs * -(-(config.max_context_len + tokens_per_req) // config.page_size)
        int32 = dict(dtype=torch.int32, device=config.device)
        qo = torch.arange(max_bs + 1, **int32) * tokens_per_req if tokens_per_req else None
        return cls(kv_indptr=torch.zeros(max_bs + 1, **int32), kv_indices=torch.zeros(max_pages, **int32),
                   kv_last_page_len=torch.ones(max_bs, **int32), qo_indptr=qo)


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_cuda_graph = True
    supports_extend_graph = True

    @classmethod
    def is_available(cls, device: str) -> bool:
        """For "auto": a CUDA device and an installed flashinfer (found, not imported)."""
        return (torch.device(device).type == "cuda" and torch.cuda.is_available()
                and importlib.util.find_spec("flashinfer") is not None)

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        self.options = FlashInferOptions.from_options(config.options)
        check_config(config)
        self.fi = load_flashinfer(config.device)
        group = config.num_heads // config.num_kv_heads
        tensor_cores = self.options.decode_tensor_cores
        self.decode_tensor_cores = group >= TENSOR_CORE_MIN_GROUP if tensor_cores is None else tensor_cores
        self.sm_scale = config.head_dim ** -0.5
        self.workspace = torch.zeros(self.options.workspace_mb << 20, dtype=torch.uint8, device=config.device)
        self.prefill_wrapper = self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=self.options.prefill_backend)
        self.decode_wrapper = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.decode_tensor_cores)
        self.graph_buffers: Optional[GraphBuffers] = None
        self.graph_wrappers: dict[int, Any] = {}   # captured batch size -> graph-mode decode wrapper
        self.extend_graph_buffers: Optional[GraphBuffers] = None
        self.extend_graph_wrappers: dict[int, Any] = {}   # captured batch size -> graph-mode prefill wrapper

    # -- per-step metadata -------------------------------------------------------------------
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_decode():
            fb.attn_metadata = self._plan_decode(self.decode_wrapper, fb)
        elif fb.mode.is_extend():
            fb.attn_metadata = self._plan_extend(fb)

    def _index(self, fb: "ForwardBatch") -> PagedKVIndex:
        return build_paged_kv_index(fb.req_to_token, fb.req_pool_indices, fb.seq_lens_cpu, self.config.page_size)

    def _plan_kwargs(self, fb: "ForwardBatch") -> dict:
        return dict(q_data_type=self.config.dtype, kv_data_type=fb.kv_pool.dtype, sm_scale=self.sm_scale)

    def _plan_extend(self, fb: "ForwardBatch", wrapper: Any = None) -> FlashInferMetadata:
        cfg, index = self.config, self._index(fb)
        wrapper = wrapper or self.prefill_wrapper
        wrapper.plan(
            qo_indptr(fb.extend_seq_lens_cpu), index.kv_indptr, index.kv_indices, index.kv_last_page_len,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.page_size, causal=True,
            **self._plan_kwargs(fb))
        return FlashInferMetadata(wrapper, index)

    def _plan_decode(self, wrapper: Any, fb: "ForwardBatch") -> FlashInferMetadata:
        cfg, index = self.config, self._index(fb)
        wrapper.plan(index.kv_indptr, index.kv_indices, index.kv_last_page_len, cfg.num_heads,
                     cfg.num_kv_heads, cfg.head_dim, cfg.page_size, **self._plan_kwargs(fb))
        return FlashInferMetadata(wrapper, index)

    # -- attention ---------------------------------------------------------------------------
    def _run(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [T, H, D] -> [T, H * D] with the step's planned wrapper."""
        meta: FlashInferMetadata = fb.attn_metadata
        t, heads, dim = q.shape
        page = self.config.page_size
        kv_cache = (paged_view(fb.kv_pool.k_buffer(layer.layer_id), page),
                    paged_view(fb.kv_pool.v_buffer(layer.layer_id), page))
        out = q.new_empty(t, heads, dim)
        extra = {}
        if not math.isclose(layer.scaling, self.sm_scale, rel_tol=1e-12):
            extra["q_scale"] = layer.scaling / self.sm_scale
        meta.wrapper.run(q.contiguous(), kv_cache, out=out, **extra)
        return out.view(t, heads * dim)

    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        return self._run(q, layer, fb)

    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        return self._run(q, layer, fb)

    # -- CUDA-graph hooks (decode) -------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int) -> None:
        self.graph_buffers = GraphBuffers.allocate(max_bs, self.config)
        self.graph_wrappers = {}

    def init_extend_graph_state(self, max_bs: int, tokens_per_req: int) -> None:
        self.extend_graph_buffers = GraphBuffers.allocate(max_bs, self.config, tokens_per_req)
        self.extend_graph_wrappers = {}

    def _capture_extend(self, fb: "ForwardBatch") -> None:
        buffers = self.extend_graph_buffers
        if buffers is None:
            raise RuntimeError("init_extend_graph_state must run before an extend graph is captured")
        bs = fb.batch_size
        if bs + 1 > buffers.qo_indptr.shape[0]:
            raise ValueError(f"batch_size {bs} exceeds the extend graph buffers ({buffers.qo_indptr.shape[0] - 1})")
        wrapper = self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=buffers.qo_indptr[:bs + 1],
            paged_kv_indptr_buf=buffers.kv_indptr[:bs + 1], paged_kv_indices_buf=buffers.kv_indices,
            paged_kv_last_page_len_buf=buffers.kv_last_page_len[:bs], backend=self.options.prefill_backend)
        self.extend_graph_wrappers[bs] = wrapper
        fb.attn_metadata = self._plan_extend(fb, wrapper)

    def _replay_extend(self, fb: "ForwardBatch") -> None:
        wrapper = self.extend_graph_wrappers.get(fb.batch_size)
        if wrapper is None:
            raise ValueError(f"no extend graph was captured for batch size {fb.batch_size} "
                             f"(captured: {sorted(self.extend_graph_wrappers)})")
        fb.attn_metadata = self._plan_extend(fb, wrapper)

    def init_forward_metadata_capture(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_extend():
            return self._capture_extend(fb)
        if self.graph_buffers is None:
            raise RuntimeError("init_cuda_graph_state must run before a graph is captured")
        bs = fb.batch_size
        if bs + 1 > self.graph_buffers.kv_indptr.shape[0]:
            raise ValueError(f"batch_size {bs} exceeds the graph buffers "
                             f"({self.graph_buffers.kv_indptr.shape[0] - 1})")
        buffers = self.graph_buffers
        wrapper = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.decode_tensor_cores,
            paged_kv_indptr_buffer=buffers.kv_indptr[:bs + 1], paged_kv_indices_buffer=buffers.kv_indices,
            paged_kv_last_page_len_buffer=buffers.kv_last_page_len[:bs])
        self.graph_wrappers[bs] = wrapper
        fb.attn_metadata = self._plan_decode(wrapper, fb)

    def init_forward_metadata_replay(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_extend():
            return self._replay_extend(fb)
        wrapper = self.graph_wrappers.get(fb.batch_size)
        if wrapper is None:
            raise ValueError(f"no decode graph was captured for batch size {fb.batch_size} "
                             f"(captured: {sorted(self.graph_wrappers)})")
        fb.attn_metadata = self._plan_decode(wrapper, fb)

