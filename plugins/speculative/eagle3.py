"""EAGLE-3 heads: draft from three of the target's layers, over a smaller draft vocabulary.

Head (the published EAGLE-3 checkpoint layout, as SGLang and vLLM load it): config.json is a
Llama config (architectures LlamaForCausalLMEagle3) with ``draft_vocab_size`` (default: the
vocabulary), optional ``target_hidden_size`` (default hidden_size) and ``bias`` (fc bias), and
``eagle_config.eagle_aux_hidden_state_layer_ids`` (also read at the top level): the target layers
whose outputs it reads, default (1, L/2 - 1, L - 4) for a target of L layers. Weights:

    fc.weight [H, 3 * H_target]                         fuses the three target states
    midlayer.input_layernorm / hidden_norm / post_attention_layernorm .weight
    midlayer.self_attn.{q,k,v}_proj.weight [*, 2H]      attention reads concat(embed, hidden)
    midlayer.self_attn.o_proj, midlayer.mlp.{gate,up,down}_proj
    norm.weight, lm_head.weight [V_draft, H]
    d2t [V_draft] int64: draft id d is target id d + d2t[d]   (t2d is not needed)
    embed_tokens.weight (optional: the target's embedding otherwise)

Forward at one position (hidden: the fused target states, or in chain steps the head's own
pre-norm output):

    h = fc(hidden) if it is the target's, residual = h
    x = attn(concat(input_layernorm(embed(token)), hidden_norm(h)))
    x, residual = post_attention_layernorm(x, residual); x = mlp(x)
    out, feature = norm(x, residual)                  out -> lm_head, feature -> next chain step

Heads with more than one layer are not supported yet (refused at load).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.embedding import VocabEmbedding
from kvyard.layers.linear import Linear
from kvyard_plugins.speculative.eagle import EagleAlgorithm
from kvyard_plugins.speculative.head_layers import (HeadAttention, HeadMLP, WeightSource, head_dims, head_kv_layout,
                                                    norm, rotary_for)

logger = logging.getLogger(__name__)


def aux_layer_ids(cfg: Any, target_layers: int) -> tuple[int, ...]:
    """The target layers (outputs) the head reads: its config's, else EAGLE-3's default."""
    eagle_config = getattr(cfg, "eagle_config", None) or {}
    ids = eagle_config.get("eagle_aux_hidden_state_layer_ids") or getattr(cfg, "eagle_aux_hidden_state_layer_ids", None)
    if ids is None:
        ids = (1, target_layers // 2 - 1, target_layers - 4)
    ids = tuple(int(i) for i in ids)
    if len(ids) != 3 or not all(0 <= i < target_layers for i in ids):
        raise ValueError(f"speculative_draft_model_path: the EAGLE-3 head reads target layers {list(ids)}: "
                         f"it needs three of the target's {target_layers}")
    return ids


class Eagle3Head(nn.Module):
    """DraftHead (core/speculative.py) of an EAGLE-3 checkpoint."""

    def __init__(self, cfg: Any, src: WeightSource, target_embed: nn.Module, target_hidden: int,
                 vocab_size: int, dtype, device):
        super().__init__()
        self.dims = dims = head_dims(cfg)
        if dims.num_layers != 1:
            raise ValueError(f"speculative_draft_model_path: EAGLE-3 heads of {dims.num_layers} layers are "
                             "not supported yet (1 layer)")
        h = dims.hidden_size
        self.num_heads = dims.num_heads
        self.feature_size = dims.hidden_size     # the chain steps' hidden input (CUDA graphs size it)
        hidden_in = getattr(cfg, "target_hidden_size", None) or h
        if hidden_in != target_hidden:
            raise ValueError(f"speculative_draft_model_path: the head's target_hidden_size ({hidden_in}) "
                             f"differs from the target's hidden size ({target_hidden})")
        kw = dict(dtype=dtype, device=device)
        self.fc = Linear(3 * hidden_in, h, bias=bool(getattr(cfg, "bias", False)), prefix="fc", **kw)
        self.input_layernorm, self.hidden_norm = norm(dims, **kw), norm(dims, **kw)
        self.self_attn = HeadAttention(dims, 0, 2 * h, dtype, device, bias=bool(getattr(cfg, "attention_bias", False)))
        self.post_attention_layernorm, self.norm = norm(dims, **kw), norm(dims, **kw)
        self.mlp = HeadMLP(dims, dtype, device)
        self.rotary = rotary_for(cfg, dims, dtype, device)
        self.embed = self._embedding(src, target_embed, vocab_size, h, dtype, device)
        draft_vocab = getattr(cfg, "draft_vocab_size", None) or vocab_size
        self.draft_to_target = self._vocab_map(src, draft_vocab, vocab_size, device)
        self.lm_head = Linear(h, draft_vocab, prefix="lm_head", **kw)
        self._load(src, cfg, draft_vocab)

    def _embedding(self, src, target_embed, vocab_size, h, dtype, device):
        if src.has("embed_tokens.weight"):
            own = VocabEmbedding(vocab_size, h, dtype, device, prefix="embed_tokens")
            own.load(src.take("embed_tokens.weight"), "embed_tokens.weight")
            return own
        if target_embed.embedding_dim != h:
            raise ValueError("speculative_draft_model_path: the EAGLE-3 head has no embed_tokens.weight and its "
                             "hidden size differs from the target's embedding")
        self._shared = (target_embed,)
        return None

    @staticmethod
    def _vocab_map(src, draft_vocab: int, vocab_size: int, device) -> Optional[torch.Tensor]:
        """int64 [V_draft] target id of each draft id (None: the draft vocabulary is the target's)."""
        if src.has("t2d"):
            src.take("t2d")
        if not src.has("d2t"):
            if draft_vocab != vocab_size:
                raise ValueError("speculative_draft_model_path: draft_vocab_size differs from the vocabulary "
                                 "but the checkpoint has no d2t map")
            return None
        d2t = src.take("d2t").to(torch.int64)
        if tuple(d2t.shape) != (draft_vocab,):
            raise ValueError(f"speculative_draft_model_path: d2t has shape {tuple(d2t.shape)}, expected ({draft_vocab},)")
        ids = d2t + torch.arange(draft_vocab)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"speculative_draft_model_path: d2t maps draft ids outside the vocabulary [0, {vocab_size})")
        return ids.to(device)

    def _load(self, src: WeightSource, cfg: Any, draft_vocab: int) -> None:
        src.linear(self.fc, ["fc"])
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            src.into(getattr(self, name).weight, f"midlayer.{name}.weight")
        self.self_attn.load(src, "midlayer.self_attn")
        self.mlp.load(src, "midlayer.mlp")
        src.into(self.norm.weight, "norm.weight")
        if src.has("lm_head.weight"):
            src.linear(self.lm_head, ["lm_head"])
        elif getattr(cfg, "tie_word_embeddings", False) and self.embed is not None and draft_vocab == self.embed.num_embeddings:
            self.lm_head.load_shard(0, self.embed.weight.data)
        else:
            src.take("lm_head.weight")     # raises: names what is missing

    def kv_layout(self):
        return head_kv_layout(self.dims)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids) if self.embed is not None else self._shared[0](input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch):
        embed = self._embed(input_ids)
        hidden = hidden.to(embed.dtype)
        if hidden.shape[-1] != self.dims.hidden_size:       # the target's three fused states
            hidden = self.fc(hidden)
        residual = hidden
        x = torch.cat([self.input_layernorm(embed), self.hidden_norm(hidden)], dim=-1)
        x = self.self_attn(x, self.rotary.lookup(positions), fb)
        x, residual = self.post_attention_layernorm(x, residual)
        out, feature = self.norm(self.mlp(x), residual)
        return feature, out

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(out).float()


class Eagle3Algorithm(EagleAlgorithm):
    name = "EAGLE3"

    def build_head(self, cfg: Any, src: WeightSource, embed, target_logits) -> tuple[nn.Module, tuple[int, ...]]:
        ctx = self.context
        if self.config.token_map:
            logger.warning("speculative_token_map ignored: an EAGLE-3 head carries its own draft vocabulary (d2t)")
        layers = aux_layer_ids(cfg, ctx.target_config.num_hidden_layers)
        head = Eagle3Head(cfg, src, embed, ctx.target_config.hidden_size, ctx.vocab_size, ctx.dtype, ctx.device)
        return head, layers
