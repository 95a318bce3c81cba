"""EAGLE (EAGLE-1/2 heads): a small decoder that drafts from the target's own hidden states.

Head (the published EAGLE checkpoint layout, as SGLang and vLLM load it): config.json is a Llama
config (hidden size = the target's); weights ``fc.weight`` [H, 2H] (+ ``fc.bias``) and
``layers.{i}.*`` Llama decoder layers whose first has no input_layernorm; the token embedding
and the LM head are the target's (an ``embed_tokens.weight`` in the checkpoint is ignored, as
SGLang does).

    x = fc(concat(embed(token p+1), target hidden at p))      target hidden: after its final norm
    x = layers(x)                                             with the head's own KV
    feature = x + residual      (no final norm: the target's LM head reads it directly)

Chain steps feed the head its own feature in place of the target's hidden state. With
``--speculative-token-map`` (a torch-saved list of token ids, FR-Spec) drafts are restricted to
those ids. With ``--speculative-eagle-topk`` k > 1 drafts are top-k trees (EAGLE-2: k beams per
step, the ``num_draft_tokens - 1`` best nodes by path probability kept). The KV and drafting
mechanics are the core's (core/executor/draft_head.py, draft_tree.py).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from kvyard.forward_batch import FINAL_HIDDEN, ForwardBatch
from kvyard.layers.linear import Linear
from kvyard.speculative import DraftContext, DraftInput, HiddenStep, SpeculativeAlgorithm, SpeculativeConfig
from kvyard_plugins.speculative.head_layers import (HeadAttention, HeadDims, HeadMLP, WeightSource, head_dims,
                                                    head_kv_layout, load_head_config, norm, read_head_weights,
                                                    rotary_for)

logger = logging.getLogger(__name__)


class _EagleLayer(nn.Module):
    def __init__(self, dims: HeadDims, layer_id: int, bias: bool, dtype, device):
        super().__init__()
        # the first layer reads fc's output unnormalized (the published heads have no norm there)
        self.input_layernorm = norm(dims, dtype, device) if layer_id > 0 else None
        self.self_attn = HeadAttention(dims, layer_id, dims.hidden_size, dtype, device, bias=bias)
        self.post_attention_layernorm = norm(dims, dtype, device)
        self.mlp = HeadMLP(dims, dtype, device)

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor], cos_sin, fb: ForwardBatch):
        if residual is None:
            residual = h
            x = h if self.input_layernorm is None else self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        x = self.self_attn(x, cos_sin, fb)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def load(self, src: WeightSource, prefix: str) -> None:
        if self.input_layernorm is not None:
            src.into(self.input_layernorm.weight, f"{prefix}.input_layernorm.weight")
        src.into(self.post_attention_layernorm.weight, f"{prefix}.post_attention_layernorm.weight")
        self.self_attn.load(src, f"{prefix}.self_attn")
        self.mlp.load(src, f"{prefix}.mlp")


class EagleHead(nn.Module):
    """DraftHead (core/speculative.py) of an EAGLE checkpoint."""

    def __init__(self, cfg: Any, src: WeightSource, embed: nn.Module, target_logits, dtype, device,
                 hot_ids: Optional[torch.Tensor] = None):
        super().__init__()
        self.dims = dims = head_dims(cfg)
        self.num_heads = dims.num_heads
        self.feature_size = dims.hidden_size     # the chain steps' hidden input (CUDA graphs size it)
        self._shared = (embed, target_logits)        # the target's: not this module's parameters
        h = dims.hidden_size
        self.fc = Linear(2 * h, h, bias=src.has("fc.bias"), prefix="fc", dtype=dtype, device=device)
        bias = bool(getattr(cfg, "attention_bias", False))
        self.layers = nn.ModuleList(_EagleLayer(dims, i, bias, dtype, device) for i in range(dims.num_layers))
        self.rotary = rotary_for(cfg, dims, dtype, device)
        self.draft_to_target = None if hot_ids is None else hot_ids.to(device)
        src.linear(self.fc, ["fc"])
        for i, layer in enumerate(self.layers):
            layer.load(src, f"layers.{i}")

    def kv_layout(self):
        return head_kv_layout(self.dims)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch):
        embed = self._shared[0](input_ids)
        x = self.fc(torch.cat([embed, hidden.to(embed.dtype)], dim=-1))
        cos_sin = self.rotary.lookup(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, fb)
        feature = x + residual
        return feature, feature

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        logits = self._shared[1](out)
        return logits if self.draft_to_target is None else logits[:, self.draft_to_target]


def load_token_map(path: str, vocab_size: int) -> torch.Tensor:
    """int64 [K] token ids of a torch-saved list or tensor (SGLang's --speculative-token-map)."""
    try:
        ids = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True), dtype=torch.int64).flatten()
    except Exception as exc:
        raise ValueError(f"speculative_token_map: cannot read {path}: {exc}") from exc
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"speculative_token_map: ids must be a non-empty list in [0, {vocab_size})")
    return ids


class EagleAlgorithm(SpeculativeAlgorithm):
    name = "EAGLE"

    def __init__(self, config: SpeculativeConfig, context: DraftContext):
        super().__init__(config, context)
        if context.make_draft_head is None or context.enable_hidden_capture is None:
            raise ValueError(f"speculative_algorithm {self.name}: this engine cannot run a draft head")
        head_config = load_head_config(config.draft_model_path)
        src = WeightSource(read_head_weights(config.draft_model_path), self.name)
        embed, target_logits = context.target_modules()
        head, layers = self.build_head(head_config, src, embed, target_logits)
        context.enable_hidden_capture(layers)
        self.runner = context.make_draft_head(head.eval(), config.num_steps, topk=config.eagle_topk)
        logger.info("%s head %s: %d layer(s), hidden %d, reading target layers %s", self.name,
                    config.draft_model_path, head.dims.num_layers, head.dims.hidden_size, list(layers))

    def build_head(self, cfg: Any, src: WeightSource, embed, target_logits) -> tuple[nn.Module, tuple[int, ...]]:
        """(the head, the target layers it reads)."""
        ctx = self.context
        target_hidden = ctx.target_config.hidden_size
        if cfg.hidden_size != target_hidden:
            raise ValueError(f"speculative_draft_model_path: the EAGLE head's hidden_size ({cfg.hidden_size}) "
                             f"differs from the target's ({target_hidden})")
        hot = load_token_map(self.config.token_map, ctx.vocab_size) if self.config.token_map else None
        head = EagleHead(cfg, src, embed, target_logits, ctx.dtype, ctx.device, hot)
        return head, (FINAL_HIDDEN,)

    def propose(self, requests: Sequence[DraftInput]) -> list:
        depth = [min(r.depth_limit, self.config.num_steps) for r in requests]
        if self.config.eagle_topk > 1:      # a top-k tree, the EAGLE-2 way (core/executor/draft_tree.py)
            return self.runner.propose_tree(requests, depth, [r.max_draft_len for r in requests])
        return self.runner.propose(requests, depth)

    def observe(self, steps: Sequence[HiddenStep]) -> None:
        self.runner.observe(steps)

    def release(self, rid: str) -> None:
        self.runner.release(rid)

    def close(self) -> None:
        self.runner.close()
