"""flex_attention: torch's FlexAttention over the paged KV pool (CPU and CUDA).

Per step (init_forward_metadata, shared by every layer):
  * the page table gives each request's slots ``req_to_token[req_pool_indices[b], :seq_len_b]``;
    concatenated they are the step's packed key sequence kv_slots [L] (L = sum of seq lens);
  * every query row and every packed key gets (request id, position); the mask is
        same request  and  key position <= query position
    (causal inside the new tokens, full over the cached prefix; decode is the case of one
    query per request), and the BlockMask is built from it directly: per (query block, key
    block) tile, partial tiles run the mask, full tiles skip it, empty tiles are never visited.
Per layer: k/v rows at kv_slots are gathered into [1, Hkv, L, D] and flex_attention runs with
enable_gqa, q as [1, H, T, D].

On CUDA flex_attention is compiled (dynamic shapes), which uses the tile sparsity; on the CPU it
runs eagerly (torch's unfused implementation, the inductor CPU template does not build with
dynamic shapes here): correct and exact in float32, fine for tests and small batches.
A query row with no key (graph padding, seq_len 0) gives zeros.

Tree-masked extend (``fb.spec_tree``, speculative tree verify): each request's block of new
queries x new keys in the dense mask is replaced by its tree block, and the mask is read from that
dense [T, L] tensor (compiled too).

Layer features: a sliding-window layer (window W) adds ``key position > query position - W`` to
the mask; its BlockMask is built on first use per distinct W in the step and shared by every
layer with that window. A logit cap c is a score_mod, c * tanh(score / c), applied to the scaled
score before the mask (FlexAttention's order, and Gemma's).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kvyard.attention import AttentionBackend, AttentionConfig

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention

BLOCK = 128   # FlexAttention's tile (query and key side)


@dataclass
class FlexMetadata:
    kv_slots: torch.Tensor     # [L] int64 packed key sequence of the step
    block_mask: BlockMask      # over [T queries, L keys]
    q_doc: torch.Tensor        # [T] request of each query row, and its position
    q_pos: torch.Tensor
    kv_doc: torch.Tensor       # [L] request of each packed key, and its position
    kv_pos: torch.Tensor
    windowed: dict = field(default_factory=dict)   # sliding window W -> its BlockMask


def doc_window_mask_mod(q_doc: torch.Tensor, q_pos: torch.Tensor, kv_doc: torch.Tensor,
                        kv_pos: torch.Tensor, window: int) -> Callable:
    """The causal mask of doc_causal_mask_mod narrowed to the last ``window`` positions."""
    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_doc[q_idx] == kv_doc[kv_idx]) & (kv_pos[kv_idx] <= q_pos[q_idx])
                & (kv_pos[kv_idx] > q_pos[q_idx] - window))
    return mask_mod


def soft_cap_score_mod(cap: torch.Tensor) -> Callable:
    """``cap`` is a 0-dim float32 tensor on the scores' device: compiled flex_attention takes a
    captured device tensor as a kernel input, while a captured Python float is lifted to a host
    scalar that inductor cannot lower."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return score_mod


def doc_causal_mask_mod(q_doc: torch.Tensor, q_pos: torch.Tensor, kv_doc: torch.Tensor,
                        kv_pos: torch.Tensor) -> Callable:
    """The mask from per-row (request, position) vectors: O(T + L) memory (compiled kernels)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_doc[q_idx] == kv_doc[kv_idx]) & (kv_pos[kv_idx] <= q_pos[q_idx])
    return mask_mod


def dense_mask_mod(allowed: torch.Tensor) -> Callable:
    """The mask as one lookup in allowed [T, L]: 3x cheaper than the vector form in the eager
    (CPU) path, which evaluates the mask over the whole [T, L] grid in every layer."""
    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx]
    return mask_mod


def block_mask_from_dense(allowed: torch.Tensor, mask_mod: Callable) -> BlockMask:
    """allowed [T, L] bool -> BlockMask over tiles of BLOCK x BLOCK: a tile is full when every
    entry is allowed (its mask is skipped), partial when some are; edge tiles are never full."""
    t, length = allowed.shape
    tq, tk = -(-t // BLOCK), -(-length // BLOCK)
    padded = allowed.new_zeros(tq * BLOCK, tk * BLOCK)
    padded[:t, :length] = allowed
    tiles = padded.view(tq, BLOCK, tk, BLOCK)
    full = tiles.all(dim=3).all(dim=1)                    # [tq, tk]
    partial = tiles.any(dim=3).any(dim=1) & ~full
    return BlockMask.from_kv_blocks(*_tile_lists(partial), *_tile_lists(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(t, length))


def _tile_lists(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chosen [tq, tk] bool -> (counts [1, 1, tq] int32, indices [1, 1, tq, tk] int32 with the
    chosen key tiles of each query tile first, in ascending order)."""
    counts = chosen.sum(dim=1, dtype=torch.int32)
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def _with_tree(allowed: torch.Tensor, fb: "ForwardBatch") -> torch.Tensor:
    """allowed [T, L] with each request's block of new queries x new keys replaced by its tree
    mask (kvyard.forward_batch.TreeMask; the prefix columns stay visible)."""
    q0 = k0 = 0
    for i, (prefix, n) in enumerate(zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)):
        allowed[q0:q0 + n, k0 + prefix:k0 + prefix + n] = fb.spec_tree.mask(i)
        q0, k0 = q0 + n, k0 + prefix + n
    return allowed


class FlexAttentionBackend(AttentionBackend):
    name = "flex_attention"
    supports_cuda_graph = False
    supported_features = frozenset({"sliding_window", "logit_cap", "spec_tree"})

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        self.compiled = str(config.device).startswith("cuda")
        self._score_mods: dict = {}
        if self.compiled:
            self._attend = torch.compile(flex_attention, dynamic=True)
        else:
            # the eager path is the deliberate choice on the CPU: silence torch's hint to compile
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            self._attend = flex_attention

    # -- per-step metadata -------------------------------------------------------------------
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if not (fb.mode.is_decode() or fb.mode.is_extend()):
            return
        dev = fb.req_to_token.device
        seq_lens = fb.seq_lens_cpu
        rows = fb.req_to_token.index_select(0, fb.req_pool_indices)
        kv_slots = torch.cat([rows[i, :n] for i, n in enumerate(seq_lens)]).long()
        lens = torch.tensor(seq_lens, dtype=torch.int64, device=dev)
        q_counts = torch.tensor(fb.extend_seq_lens_cpu, dtype=torch.int64, device=dev)
        docs = torch.arange(len(seq_lens), device=dev)
        kv_doc = docs.repeat_interleave(lens)
        kv_pos = torch.arange(kv_slots.numel(), device=dev) - (lens.cumsum(0) - lens).repeat_interleave(lens)
        q_doc = docs.repeat_interleave(q_counts)
        q_starts = (q_counts.cumsum(0) - q_counts).repeat_interleave(q_counts)
        # query j of request b sits at position (seq_len_b - new_b) + j
        q_pos = (lens - q_counts).repeat_interleave(q_counts) + torch.arange(q_doc.numel(), device=dev) - q_starts
        allowed = (q_doc[:, None] == kv_doc[None, :]) & (kv_pos[None, :] <= q_pos[:, None])
        if fb.spec_tree is not None:
            allowed = _with_tree(allowed, fb)
        if self.compiled and fb.spec_tree is None:
            mask_mod = doc_causal_mask_mod(q_doc, q_pos, kv_doc, kv_pos)
        else:
            mask_mod = dense_mask_mod(allowed)
        fb.attn_metadata = FlexMetadata(kv_slots, block_mask_from_dense(allowed, mask_mod),
                                        q_doc, q_pos, kv_doc, kv_pos)

    def _score_mod(self, cap, device: torch.device) -> Callable | None:
        """One score_mod object per cap value, so compiled flex_attention is not re-traced per layer."""
        if not cap:
            return None
        if cap not in self._score_mods:
            self._score_mods[cap] = soft_cap_score_mod(torch.tensor(float(cap), device=device))
        return self._score_mods[cap]

    def _block_mask(self, meta: FlexMetadata, window) -> BlockMask:
        """The step's causal BlockMask, or the one narrowed to a sliding window (cached per W)."""
        if not window:
            return meta.block_mask
        if window not in meta.windowed:
            allowed = ((meta.q_doc[:, None] == meta.kv_doc[None, :])
                       & (meta.kv_pos[None, :] <= meta.q_pos[:, None])
                       & (meta.kv_pos[None, :] > meta.q_pos[:, None] - window))
            if self.compiled:
                mask_mod = doc_window_mask_mod(meta.q_doc, meta.q_pos, meta.kv_doc, meta.kv_pos, window)
            else:
                mask_mod = dense_mask_mod(allowed)
            meta.windowed[window] = block_mask_from_dense(allowed, mask_mod)
        return meta.windowed[window]

    # -- attention ---------------------------------------------------------------------------
    def _attention(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [T, H, D] -> [T, H * D]."""
        meta: FlexMetadata = fb.attn_metadata
        t, heads, dim = q.shape
        k = fb.kv_pool.k_buffer(layer.layer_id).index_select(0, meta.kv_slots).to(q.dtype)
        v = fb.kv_pool.v_buffer(layer.layer_id).index_select(0, meta.kv_slots).to(q.dtype)
        out = self._attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           block_mask=self._block_mask(meta, layer.sliding_window), scale=layer.scaling,
                           score_mod=self._score_mod(layer.logit_cap, q.device),
                           enable_gqa=heads != k.shape[1])
        return out[0].transpose(0, 1).reshape(t, heads * dim)

    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        return self._attention(q, layer, fb)

    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        return self._attention(q, layer, fb)
