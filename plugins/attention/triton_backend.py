"""triton: kvyard's own Triton attention kernels over the paged KV pool (CUDA; CPU interpreter).

extend  one launch for the whole batch: new tokens over cached prefix + themselves
        (triton_kernels/extend_attention.py). Per-step metadata: per-request new-token counts and
        prefix lengths as device vectors, and the longest new-token count as a host int.
decode  split-KV flash-decoding + reduce (triton_kernels/decode_attention.py). The kernels read
        only device tensors of the batch (seq_lens, req_pool_indices), so the step's metadata is
        just the split workspace. For CUDA graphs that workspace is allocated once for the
        largest batch (init_cuda_graph_state) and captured steps take views of it: nothing is
        allocated inside a captured step, and replay has nothing to refill (the graph runner
        refills seq_lens / req_pool_indices in place).
extend graphs (speculative verify: W new tokens per request; kvyard.executor.extend_graph_runner):
        init_extend_graph_state allocates q_lens (all W) and prefix_lens for the largest batch;
        a captured extend reads views of them with max_q_len W, and replay copies the batch's
        prefix lengths into prefix_lens (the only metadata that changes).

Splits: a decode batch of B requests takes S = min(max splits, ceil(2 * SMs / (B * Hkv)))
key ranges per request, at least 1: split-KV exists to fill the GPU when B * Hkv programs are too
few; at large B the programs already fill it, and S = 1 writes the output directly and skips the
reduce launch. S depends on B alone, so each captured graph has its own fixed S. Under the CPU
interpreter (no SM count) S is always the maximum.

Options (AttentionConfig.options): triton_attention_num_kv_splits (the most splits S, default 8),
triton_attention_reduce_in_fp32 (keep the split partial outputs in float32 instead of the
activation dtype; default False). Sliding-window and soft-capped layers pass their window and
cap to both kernels (see their docstrings); a tree-masked verify extend (``fb.spec_tree``) passes
its packed mask to the extend kernel. KV layouts: "mha" and "mla" (the V buffer is the K
buffer; each head keeps the leading layer.v_head_dim output columns). Writing the new tokens' k/v is the pool's set_kv, which takes
the fused Triton write on CUDA (kvyard.kernels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from kvyard.attention import AttentionBackend, value_columns, AttentionConfig
from kvyard_plugins.attention.triton_kernels.decode_attention import decode_attention, decode_workspace
from kvyard_plugins.attention.triton_kernels.extend_attention import extend_attention

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention

DEFAULT_NUM_KV_SPLITS = 8


@dataclass
class TritonExtendMetadata:
    q_lens: torch.Tensor        # [B] int64 new tokens per request
    prefix_lens: torch.Tensor   # [B] int64 cached tokens per request
    max_q_len: int              # host: sizes the grid


@dataclass
class TritonDecodeMetadata:
    mid_o: torch.Tensor         # [B, H, S, D] split partial outputs (a view of the workspace)
    mid_lse: torch.Tensor       # [B, H, S] float32 split log2-sum-exp


def read_options(options: dict) -> tuple[int, bool]:
    """(num_kv_splits, reduce_in_fp32) from AttentionConfig.options, checked."""
    splits = options.get("triton_attention_num_kv_splits", DEFAULT_NUM_KV_SPLITS)
    if splits is None:
        splits = DEFAULT_NUM_KV_SPLITS
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise ValueError(f"triton_attention_num_kv_splits must be an integer >= 1, got {splits!r}")
    return splits, bool(options.get("triton_attention_reduce_in_fp32", False))


def _tree_args(fb: "ForwardBatch") -> tuple:
    """(tree_mask, tree_start) of a tree-masked verify extend (kvyard.forward_batch.TreeMask), or ()."""
    tree = fb.spec_tree
    return () if tree is None else (tree.packed, tree.offsets)


class TritonAttnBackend(AttentionBackend):
    name = "triton"
    supports_fp8_kv = True
    supports_cuda_graph = True
    supports_extend_graph = True
    supported_features = frozenset({"sliding_window", "logit_cap", "spec_tree"})
    kv_layouts = ("mha", "mla")

    @classmethod
    def is_available(cls, device: str) -> bool:
        """CUDA, or the CPU under the Triton interpreter (TRITON_INTERPRET=1: slow, for tests)."""
        if torch.device(device).type == "cuda":
            return torch.cuda.is_available()
        return os.environ.get("TRITON_INTERPRET", "0") == "1"

    def __init__(self, config: AttentionConfig):
        if not self.is_available(config.device):
            raise ValueError(f"attention backend 'triton' cannot run on {config.device!r}: it needs a CUDA "
                             "device, or TRITON_INTERPRET=1 for the (slow) CPU interpreter")
        super().__init__(config)
        self.num_kv_splits, self.reduce_in_fp32 = read_options(config.options)
        self.mid_dtype = torch.float32 if self.reduce_in_fp32 else config.dtype
        self.sm_count = (torch.cuda.get_device_properties(config.device).multi_processor_count
                         if torch.device(config.device).type == "cuda" else None)
        self._graph_workspace: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._extend_graph: Optional[TritonExtendMetadata] = None   # q_lens / prefix_lens [max_bs], max_q_len W

    # -- per-step metadata -------------------------------------------------------------------
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_decode():
            mid_o, mid_lse = self._workspace(fb.batch_size, fb.req_to_token.device)
            fb.attn_metadata = self._decode_metadata(mid_o, mid_lse, fb.batch_size)
        elif fb.mode.is_extend():
            dev = fb.req_to_token.device
            fb.attn_metadata = TritonExtendMetadata(
                q_lens=torch.tensor(fb.extend_seq_lens_cpu, dtype=torch.int64, device=dev),
                prefix_lens=torch.tensor(fb.extend_prefix_lens_cpu, dtype=torch.int64, device=dev),
                max_q_len=max(fb.extend_seq_lens_cpu, default=0))

    def num_splits(self, batch: int) -> int:
        """S for a decode batch of `batch` requests (module docstring)."""
        if self.sm_count is None or batch < 1:
            return self.num_kv_splits
        programs = batch * self.config.num_kv_heads
        return max(1, min(self.num_kv_splits, -(-2 * self.sm_count // programs)))

    def _decode_metadata(self, mid_o: torch.Tensor, mid_lse: torch.Tensor, batch: int) -> TritonDecodeMetadata:
        splits = self.num_splits(batch)
        return TritonDecodeMetadata(mid_o[:batch, :, :splits], mid_lse[:batch, :, :splits])

    def _workspace(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return decode_workspace(batch, cfg.num_heads, self.num_kv_splits, cfg.head_dim, self.mid_dtype, device)

    # -- attention ---------------------------------------------------------------------------
    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [T, H, D] -> [T, H * D]."""
        meta: TritonExtendMetadata = fb.attn_metadata
        t, heads, dim = q.shape
        out = q.new_empty(t, heads, dim)
        pool = fb.kv_pool   # an fp8 pool stores k / k_scale, v / v_scale (kv_pool.py)
        k_scale, v_scale = pool.k_scales[layer.layer_id], pool.v_scales[layer.layer_id]
        extend_attention(q, pool.k_buffer(layer.layer_id), pool.v_buffer(layer.layer_id), out,
                         fb.req_to_token, fb.req_pool_indices, fb.extend_start_loc, meta.q_lens,
                         meta.prefix_lens, meta.max_q_len, layer.scaling * k_scale, layer.sliding_window or 0,
                         layer.logit_cap or 0.0, *_tree_args(fb))
        if v_scale != 1.0:
            out.mul_(v_scale)
        return value_columns(out, layer)

    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [B, H, D] -> [B, H * D]."""
        meta: TritonDecodeMetadata = fb.attn_metadata
        b, heads, dim = q.shape
        out = q.new_empty(b, heads, dim)
        pool = fb.kv_pool
        k_scale, v_scale = pool.k_scales[layer.layer_id], pool.v_scales[layer.layer_id]
        decode_attention(q, pool.k_buffer(layer.layer_id), pool.v_buffer(layer.layer_id), out,
                         fb.req_to_token, fb.req_pool_indices, fb.seq_lens, meta.mid_o, meta.mid_lse,
                         layer.scaling * k_scale, layer.sliding_window or 0, layer.logit_cap or 0.0)
        if v_scale != 1.0:
            out.mul_(v_scale)
        return value_columns(out, layer)

    # -- CUDA-graph hooks (decode) -------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int) -> None:
        self._graph_workspace = self._workspace(max_bs, self.config.device)

    # -- CUDA-graph hooks (extend of W tokens per request) ----------------------------------------
    def init_extend_graph_state(self, max_bs: int, tokens_per_req: int) -> None:
        long = dict(dtype=torch.int64, device=self.config.device)
        self._extend_graph = TritonExtendMetadata(q_lens=torch.full((max_bs,), tokens_per_req, **long),
                                                  prefix_lens=torch.zeros(max_bs, **long), max_q_len=tokens_per_req)

    def _extend_graph_metadata(self, fb: "ForwardBatch") -> TritonExtendMetadata:
        static = self._extend_graph
        if static is None:
            raise RuntimeError("init_extend_graph_state must run before an extend graph is captured")
        bs = fb.batch_size
        if bs > static.q_lens.shape[0] or set(fb.extend_seq_lens_cpu) != {static.max_q_len}:
            raise ValueError(f"an extend graph batch has up to {static.q_lens.shape[0]} requests of "
                             f"{static.max_q_len} tokens, got {list(fb.extend_seq_lens_cpu)}")
        return TritonExtendMetadata(static.q_lens[:bs], static.prefix_lens[:bs], static.max_q_len)

    def _fill_extend_graph(self, fb: "ForwardBatch") -> None:
        prefix = torch.tensor(fb.extend_prefix_lens_cpu, dtype=torch.int64)
        if self._extend_graph.prefix_lens.is_cuda:   # pinned: the copy need not wait for queued steps
            prefix = prefix.pin_memory()
        self._extend_graph.prefix_lens[:fb.batch_size].copy_(prefix, non_blocking=True)

    def init_forward_metadata_capture(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_extend():
            fb.attn_metadata = self._extend_graph_metadata(fb)
            self._fill_extend_graph(fb)
            return
        if self._graph_workspace is None:
            raise RuntimeError("init_cuda_graph_state must run before a graph is captured")
        mid_o, mid_lse = self._graph_workspace
        if fb.batch_size > mid_o.shape[0]:
            raise ValueError(f"batch_size {fb.batch_size} exceeds the graph workspace ({mid_o.shape[0]})")
        fb.attn_metadata = self._decode_metadata(mid_o, mid_lse, fb.batch_size)

    def init_forward_metadata_replay(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_extend():
            if not isinstance(fb.attn_metadata, TritonExtendMetadata):
                fb.attn_metadata = self._extend_graph_metadata(fb)
            self._fill_extend_graph(fb)
            return
        # The captured kernels read seq_lens / req_pool_indices from the runner's buffers, which
        # it has refilled in place; the workspace views are the captured ones.
        if not isinstance(fb.attn_metadata, TritonDecodeMetadata):
            self.init_forward_metadata_capture(fb)

