"""torch_native: paged attention in plain PyTorch (any device).

The pool stores k/v per slot ([num_slots, Hkv, D] per layer); token j of batch row i lives at
slot ``req_to_token[req_pool_indices[i], j]``. Only that table is read, so the page size is
transparent. Index tensors are built once per step in ``init_forward_metadata`` from host-side
lengths (no device->host sync) and shared by every layer.

extend: per request, SDPA of its new tokens over prefix + new keys. Query j of a request with
        P cached tokens sits at position P + j and sees keys 0 .. P + j.
decode: on the CPU the C++ kernel of cpu_kernels/ reads K/V straight from the pool (one call
        per layer, no gather copy). Elsewhere, or where it cannot build: all rows at once, K/V
        gathered head-major into [Hkv, B, L, D] (L = longest sequence), q viewed as
        [Hkv, B, group, D] for GQA, scores masked past each row's length, softmax in float32.
Gathered K/V land in staging buffers allocated once per step and reused by every layer.

Tree-masked extend (``fb.spec_tree``, speculative tree drafts): a request's span mask becomes
[prefix columns all True | its tree block]; the explicit path takes the same mask.

Layer features (kvyard.attention): a layer with ``sliding_window`` W or ``logit_cap`` c runs the
explicit path: scores = q.k * scale in float32, c * tanh(scores / c) when capped, then masked
(causal, and keys j <= p - W hidden from the query at position p) and softmaxed. When the model
has such layers, decode always takes the gather path (the C++ kernel knows neither feature).
KV layouts: "mha" and "mla". Under "mla" the pool's V buffer is its K buffer (one latent head),
so attention runs over the full latent + rope row and each head keeps the leading
layer.v_head_dim columns of its output (the weighted latent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from kvyard.attention import AttentionBackend, value_columns
from kvyard.kernels.native import NativeKernel
from kvyard_plugins.attention import cpu_kernels

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention


@dataclass
class ExtendSpan:
    """One request of an extend step."""
    q_start: int                   # first row of its new tokens in q [T, H, D]
    q_len: int                     # new tokens
    kv_start: int                  # first row of its keys in the step's staging buffers
    kv_slots: torch.Tensor         # [prefix + q_len] int64 slots of all its tokens
    mask: Optional[torch.Tensor]   # [q_len, prefix + q_len] bool (True = attend), or None
    is_causal: bool                # no prefix and several new tokens: SDPA's own causal mask


@dataclass
class ExtendMetadata:
    spans: list[ExtendSpan]
    k_stage: torch.Tensor          # [sum of kv lengths, Hkv * D] gather target reused by every layer
    v_stage: torch.Tensor


@dataclass
class DecodeMetadata:
    slots: torch.Tensor            # [B * L] int64, row-major [B, L]; past a row's length: slot 0
    max_len: int                   # L
    padding: torch.Tensor          # [1, B, 1, L] bool, True past a row's length; broadcasts over
                                   # the head-major scores [Hkv, B, group, L]
    seq_lens: torch.Tensor         # [B] int64 (sliding windows hide keys j < seq_len - W)
    k_stage: torch.Tensor          # [Hkv, B * L, D] head-major gather target reused by every layer
    v_stage: torch.Tensor


def _staging(fb: "ForwardBatch", *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two buffers in the pool's dtype for gathered K and V. Allocated once per step rather than
    per layer: fresh multi-MB allocations cost page faults on every layer (measured 2x slower
    CPU decode at 8 x 600 tokens)."""
    pool = fb.kv_pool.k_buffer(0)
    return pool.new_empty(shape), pool.new_empty(shape)


def _gather_rows(buffer: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """buffer [S, Hkv, D] rows at ``slots`` [N] into ``out`` [N, Hkv * D]; returns [N, Hkv, D].
    index_select over flattened rows is ~10x faster on the CPU than advanced indexing."""
    torch.index_select(buffer.view(buffer.shape[0], -1), 0, slots, out=out)
    return out.view(out.shape[0], *buffer.shape[1:])


def _gather_head_major(buffer: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """buffer [S, Hkv, D] rows at ``slots`` [N] into ``out`` [Hkv, N, D], one copy per kv head.
    Head-major K/V let one batched matmul run over (Hkv, B) without copying K/V again."""
    for h in range(buffer.shape[1]):
        torch.index_select(buffer[:, h], 0, slots, out=out[h])
    return out


def _use_cpu_kernel(fb: "ForwardBatch", dtype: torch.dtype) -> bool:
    """Decode on the CPU reads the pool with the C++ kernel where it builds (float32 / bfloat16
    pools holding the activation dtype; a --kv-cache-dtype that differs takes the torch path)."""
    pool = fb.kv_pool.k_buffer(0)
    return (pool.device.type == "cpu" and pool.dtype in (torch.float32, torch.bfloat16) and pool.dtype == dtype
            and fb.req_to_token.dtype == torch.int32 and cpu_kernels.available())


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
                        layer: "Attention", k_scale: float = 1.0,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One request's new tokens with the layer's features: q [N, H, D] at positions
    prefix .. prefix + N - 1 over k/v [L, Hkv, D] at positions 0 .. L - 1 -> [N, H, D].
    mask [N, L] bool (True = attend) replaces the causal mask where given (tree verify; the
    sliding window still counts row indices, so trees and windows are not combined)."""
    n, heads, dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    qh = q.view(n, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)     # [Hkv, G, N, D]
    scores = torch.matmul(qh, k.permute(1, 2, 0)[:, None]).float()           # [Hkv, G, N, L]
    scores = _capped(scores.mul_(layer.scaling * k_scale), layer.logit_cap)
    q_pos = torch.arange(prefix, prefix + n, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    hidden = k_pos > q_pos if mask is None else ~mask
    if layer.sliding_window:
        hidden |= k_pos <= q_pos - layer.sliding_window
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v.permute(1, 0, 2)[:, None])                    # [Hkv, G, N, D]
    return out.permute(2, 0, 1, 3).reshape(n, heads, dim)


def _capped(scores: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """c * tanh(scores / c) in place when the layer caps its logits."""
    return scores.div_(cap).tanh_().mul_(cap) if cap else scores


def _layer_features(config) -> frozenset:
    """The model's layer features (the tree mask concerns extend steps only)."""
    return config.features - {"spec_tree"}


def _kv_scales(fb, layer) -> tuple[float, float]:
    """An fp8 pool stores k / k_scale, v / v_scale: k_scale folds into the softmax scale,
    v_scale into the output."""
    pool = fb.kv_pool
    return pool.k_scales[layer.layer_id], pool.v_scales[layer.layer_id]


class TorchNativeBackend(AttentionBackend):
    name = "torch_native"
    supports_fp8_kv = True
    supports_cuda_graph = False
    supported_features = frozenset({"sliding_window", "logit_cap", "spec_tree"})
    kv_layouts = ("mha", "mla")

    # -- per-step metadata -------------------------------------------------------------------
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_decode():
            fb.attn_metadata = self._decode_metadata(fb)
        elif fb.mode.is_extend():
            fb.attn_metadata = self._extend_metadata(fb)

    def _decode_metadata(self, fb: "ForwardBatch") -> Optional[DecodeMetadata]:
        if _use_cpu_kernel(fb, self.config.dtype) and not _layer_features(self.config):
            return None   # the kernel reads req_to_token itself
        max_len = max(max(fb.seq_lens_cpu), 1)
        rows = fb.req_to_token.index_select(0, fb.req_pool_indices)[:, :max_len].long()
        # a padded row (seq_len 0) still sees its column 0 (the dummy slot) so softmax stays finite
        lengths = fb.seq_lens.clamp(min=1)
        valid = torch.arange(max_len, device=rows.device)[None, :] < lengths[:, None]
        slots = torch.where(valid, rows, torch.zeros_like(rows))
        pool = fb.kv_pool.k_buffer(0)
        k_stage, v_stage = _staging(fb, pool.shape[1], slots.numel(), pool.shape[2])
        return DecodeMetadata(slots=slots.view(-1), max_len=max_len, padding=~valid[None, :, None, :],
                              seq_lens=fb.seq_lens, k_stage=k_stage, v_stage=v_stage)

    @staticmethod
    def _extend_metadata(fb: "ForwardBatch") -> ExtendMetadata:
        rows = fb.req_to_token.index_select(0, fb.req_pool_indices)
        spans, q_start, kv_start = [], 0, 0
        for i, (prefix, q_len) in enumerate(zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)):
            kv_len = prefix + q_len
            mask = None
            if fb.spec_tree is not None:   # [q_len, prefix + q_len]: the prefix, then the tree block
                tree = fb.spec_tree.mask(i)
                mask = torch.cat([tree.new_ones(q_len, prefix), tree], dim=1)
            elif prefix > 0 and q_len > 1:
                key_pos = torch.arange(kv_len, device=rows.device)
                query_pos = torch.arange(prefix, kv_len, device=rows.device)
                mask = key_pos[None, :] <= query_pos[:, None]
            spans.append(ExtendSpan(q_start=q_start, q_len=q_len, kv_start=kv_start,
                                    kv_slots=rows[i, :kv_len].long(), mask=mask,
                                    is_causal=mask is None and prefix == 0 and q_len > 1))
            q_start += q_len
            kv_start += kv_len
        pool = fb.kv_pool.k_buffer(0)
        return ExtendMetadata(spans, *_staging(fb, kv_start, pool.shape[1] * pool.shape[2]))

    # -- attention ---------------------------------------------------------------------------
    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [T, H, D] -> [T, H * Dv]."""
        meta: ExtendMetadata = fb.attn_metadata
        k_buf, v_buf = fb.kv_pool.k_buffer(layer.layer_id), fb.kv_pool.v_buffer(layer.layer_id)
        k_scale, v_scale = _kv_scales(fb, layer)
        t, heads, dim = q.shape
        out = q.new_empty(t, heads, dim)
        for span in meta.spans:
            rows = slice(span.q_start, span.q_start + span.q_len)
            stage = slice(span.kv_start, span.kv_start + span.kv_slots.shape[0])
            k = _gather_rows(k_buf, span.kv_slots, meta.k_stage[stage]).to(q.dtype)   # [L, Hkv, D]
            v = _gather_rows(v_buf, span.kv_slots, meta.v_stage[stage]).to(q.dtype)
            if layer.sliding_window or layer.logit_cap:
                prefix = span.kv_slots.shape[0] - span.q_len
                out[rows] = _explicit_attention(q[rows], k, v, prefix, layer, k_scale, span.mask)
                continue
            # SDPA layout [1, heads, tokens, D]: 4-D inputs take the fused CPU kernel
            # (2-3x faster than 3-D ones, which fall back to the unfused math path)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=span.mask, is_causal=span.is_causal, scale=layer.scaling * k_scale,
                enable_gqa=heads != k.shape[1])
            out[rows] = o[0].transpose(0, 1)
        if v_scale != 1.0:
            out.mul_(v_scale)
        return value_columns(out, layer)

    def lower_decode(self, layer: "Attention", kv_pool) -> Optional[tuple[str, tuple]]:
        """The C++ paged-decode kernel, where ``forward_decode`` would take it (same conditions,
        for every step) and the layer needs nothing beyond causal attention over K and V."""
        if not self._plain_decode(layer, kv_pool):
            return None
        return "kvyard_attn::paged_decode", (layer.scaling,)

    def lower_decode_native(self, layer: "Attention", kv_pool) -> Optional[NativeKernel]:
        """``lower_decode``'s kernel as a native descriptor over the layer's pools (same code per
        (sequence, kv head) pair)."""
        if not self._plain_decode(layer, kv_pool):
            return None
        k_buf, v_buf = kv_pool.k_buffer(layer.layer_id), kv_pool.v_buffer(layer.layer_id)
        desc = torch.ops.kvyard_attn.native_decode(k_buf, v_buf, layer.num_heads, layer.scaling)
        return NativeKernel((desc.data_ptr(),), (desc, k_buf, v_buf))

    def _plain_decode(self, layer: "Attention", kv_pool) -> bool:
        pool = kv_pool.k_buffer(layer.layer_id)
        plain = (not _layer_features(self.config) and not layer.sliding_window and not layer.logit_cap
                 and layer.v_head_dim == layer.head_dim and kv_pool.layout.separate_v)
        return plain and pool.device.type == "cpu" and pool.dtype in (torch.float32, torch.bfloat16) \
            and pool.dtype == self.config.dtype and cpu_kernels.available()

    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [B, H, D] -> [B, H * Dv]."""
        meta: Optional[DecodeMetadata] = fb.attn_metadata
        if meta is None:
            out = cpu_kernels.paged_decode(
                q.contiguous(), fb.kv_pool.k_buffer(layer.layer_id), fb.kv_pool.v_buffer(layer.layer_id),
                fb.req_to_token, fb.req_pool_indices, fb.seq_lens, layer.scaling)
            return value_columns(out, layer)
        b, heads, dim = q.shape
        kv_heads, length = layer.num_kv_heads, meta.max_len
        k = _gather_head_major(fb.kv_pool.k_buffer(layer.layer_id), meta.slots, meta.k_stage)
        v = _gather_head_major(fb.kv_pool.v_buffer(layer.layer_id), meta.slots, meta.v_stage)
        k = k.view(kv_heads, b, length, dim).to(q.dtype)
        v = v.view(kv_heads, b, length, dim).to(q.dtype)
        qh = q.view(b, kv_heads, heads // kv_heads, dim).transpose(0, 1)         # [Hkv, B, G, D]
        scores = torch.matmul(qh, k.transpose(-1, -2)).float()                  # [Hkv, B, G, L]
        k_scale, v_scale = _kv_scales(fb, layer)
        scores = _capped(scores.mul_(layer.scaling * k_scale), layer.logit_cap)
        hidden = meta.padding
        if layer.sliding_window:   # the query sits at seq_len - 1: keys j <= seq_len - 1 - W go
            keys = torch.arange(length, device=q.device)[None, :]
            outside = keys < (meta.seq_lens - layer.sliding_window)[:, None]     # [B, L]
            hidden = hidden | outside[None, :, None, :]
        scores.masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)                                             # [Hkv, B, G, D]
        if v_scale != 1.0:
            out.mul_(v_scale)
        return value_columns(out.transpose(0, 1).reshape(b, heads, dim), layer)

