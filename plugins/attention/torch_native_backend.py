"""torch_native: paged attention in plain PyTorch (any device).

The pool stores k/v per slot ([num_slots, Hkv, D] per layer); token j of batch row i lives at
slot ``req_to_token[req_pool_indices[i], j]``. Only that table is read, so the page size is
transparent. Index tensors are built once per step in ``init_forward_metadata`` from host-side
lengths (no device->host sync) and shared by every layer.

extend: per request, SDPA of its new tokens over prefix + new keys. Query j of a request with
        P cached tokens sits at position P + j and sees keys 0 .. P + j.
decode: all rows at once: K/V gathered into [B, L, Hkv, D] (L = longest sequence), q viewed as
        [B, Hkv, group, D] for GQA, scores masked past each row's length, softmax in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from kvyard.attention import AttentionBackend

if TYPE_CHECKING:
    from kvyard.forward_batch import ForwardBatch
    from kvyard.layers.attention import Attention


@dataclass
class ExtendSpan:
    """One request of an extend step."""
    q_start: int                   # first row of its new tokens in q [T, H, D]
    q_len: int                     # new tokens
    kv_slots: torch.Tensor         # [prefix + q_len] int64 slots of all its tokens
    mask: Optional[torch.Tensor]   # [q_len, prefix + q_len] bool (True = attend), or None
    is_causal: bool                # no prefix and several new tokens: SDPA's own causal mask


@dataclass
class ExtendMetadata:
    spans: list[ExtendSpan]


@dataclass
class DecodeMetadata:
    slots: torch.Tensor            # [B, L] int64; columns past a row's length point at slot 0
    padding: torch.Tensor          # [B, 1, 1, L] bool, True past a row's length; broadcasts over
                                   # the scores [B, Hkv, group, L]


class TorchNativeBackend(AttentionBackend):
    name = "torch_native"
    supports_cuda_graph = False

    # -- per-step metadata -------------------------------------------------------------------
    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        if fb.mode.is_decode():
            fb.attn_metadata = self._decode_metadata(fb)
        elif fb.mode.is_extend():
            fb.attn_metadata = self._extend_metadata(fb)

    @staticmethod
    def _decode_metadata(fb: "ForwardBatch") -> DecodeMetadata:
        max_len = max(max(fb.seq_lens_cpu), 1)
        rows = fb.req_to_token.index_select(0, fb.req_pool_indices)[:, :max_len].long()
        # a padded row (seq_len 0) still sees its column 0 (the dummy slot) so softmax stays finite
        lengths = fb.seq_lens.clamp(min=1)
        valid = torch.arange(max_len, device=rows.device)[None, :] < lengths[:, None]
        slots = torch.where(valid, rows, torch.zeros_like(rows))
        return DecodeMetadata(slots=slots, padding=~valid[:, None, None, :])

    @staticmethod
    def _extend_metadata(fb: "ForwardBatch") -> ExtendMetadata:
        rows = fb.req_to_token.index_select(0, fb.req_pool_indices)
        spans, q_start = [], 0
        for i, (prefix, q_len) in enumerate(zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)):
            kv_len = prefix + q_len
            mask = None
            if prefix > 0 and q_len > 1:
                key_pos = torch.arange(kv_len, device=rows.device)
                query_pos = torch.arange(prefix, kv_len, device=rows.device)
                mask = key_pos[None, :] <= query_pos[:, None]
            spans.append(ExtendSpan(q_start=q_start, q_len=q_len, kv_slots=rows[i, :kv_len].long(),
                                    mask=mask, is_causal=prefix == 0 and q_len > 1))
            q_start += q_len
        return ExtendMetadata(spans)

    # -- attention ---------------------------------------------------------------------------
    def forward_extend(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [T, H, D] -> [T, H * D]."""
        meta: ExtendMetadata = fb.attn_metadata
        k_buf, v_buf = fb.kv_pool.k_buffer(layer.layer_id), fb.kv_pool.v_buffer(layer.layer_id)
        t, heads, dim = q.shape
        out = q.new_empty(t, heads, dim)
        for span in meta.spans:
            rows = slice(span.q_start, span.q_start + span.q_len)
            # SDPA layout: [heads, tokens, D]
            k = k_buf.index_select(0, span.kv_slots).to(q.dtype).transpose(0, 1)
            v = v_buf.index_select(0, span.kv_slots).to(q.dtype).transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k, v, attn_mask=span.mask, is_causal=span.is_causal,
                scale=layer.scaling, enable_gqa=heads != k.shape[0])
            out[rows] = o.transpose(0, 1)
        return out.view(t, heads * dim)

    def forward_decode(self, q: torch.Tensor, layer: "Attention", fb: "ForwardBatch") -> torch.Tensor:
        """q [B, H, D] -> [B, H * D]."""
        meta: DecodeMetadata = fb.attn_metadata
        b, heads, dim = q.shape
        kv_heads = layer.num_kv_heads
        k = fb.kv_pool.k_buffer(layer.layer_id)[meta.slots].to(q.dtype)   # [B, L, Hkv, D]
        v = fb.kv_pool.v_buffer(layer.layer_id)[meta.slots].to(q.dtype)
        qg = q.view(b, kv_heads, heads // kv_heads, dim)                    # [B, Hkv, G, D]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).float()           # [B, Hkv, G, L]
        scores.mul_(layer.scaling).masked_fill_(meta.padding, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v.transpose(1, 2))                        # [B, Hkv, G, D]
        return out.reshape(b, heads * dim)
