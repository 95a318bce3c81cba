"""The pre-norm decoder skeleton shared by model plugins whose layers differ only inside their
attention and MLP blocks (the MoE and DeepSeek plugins).

    h = embed(input_ids); cos_sin = rotary.lookup(positions)      once per forward
    per layer:  x, residual = input_layernorm(h, residual)        fused residual add
                x, residual = post_attention_layernorm(self_attn(x, cos_sin, fb), residual)
                h = mlp(x)
    hidden = norm(h, residual)                                      [T, hidden]

``PreNormDecoderLayer`` subclasses build input_layernorm, self_attn, post_attention_layernorm
and mlp. ``DecoderLM`` subclasses build ``layers`` and return the checkpoint-name loaders of
each layer from ``layer_targets``; the embedding, final norm and (tied) lm_head are here
(vocabulary-parallel under ``ctx.tp``).
After loading, every sub-module with ``process_after_loading`` (linear layers, absorbed
attention weights) gets it called once.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from kvyard.forward_batch import FINAL_HIDDEN, ForwardBatch
from kvyard.layers.embedding import VocabEmbedding
from kvyard.layers.linear import Linear
from kvyard.layers.logits import LogitsHead
from kvyard.layers.norm import RMSNorm
from kvyard.layers.parallel import ColumnParallel
from kvyard.layers.rotary import RotaryEmbedding, rope_config_from_hf
from kvyard.layers.weights import copy_checked, load_named

Targets = dict[str, Callable[[Any], None]]


class PipelineLayer(nn.Module):
    """The place of a decoder layer another pipeline stage holds (no weights, never run)."""


def run_decoder_stack(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                      fb: ForwardBatch):
    """The pre-norm decoder body every such model shares: ``model.embed_tokens``, ``rotary``,
    ``layers`` (each (h, residual, cos_sin, fb) -> (h, residual)) and the final ``norm``.
    input_ids [T], positions [T] -> hidden [T, hidden] after the final norm. Stores the hidden
    states ``fb.capture_layers`` asks for in ``fb.captured`` (core/forward_batch.py).

    Pipeline parallelism (``model.pp_stage``, kvyard.distributed.PipelineStage): a stage after the
    first starts from ``fb.extras["pp_input"]`` = (h, residual) [T, hidden] each, runs only its
    layers, and every stage but the last returns (h, residual) for the next one."""
    stage = getattr(model, "pp_stage", None)
    if stage is None or stage.is_first:
        h, residual = model.embed_tokens(input_ids), None
    else:
        h, residual = fb.extras["pp_input"]
    cos_sin = model.rotary.lookup(positions)
    capture = fb.capture_layers or ()
    for i, layer in enumerate(model.layers):
        if not isinstance(layer, PipelineLayer):
            h, residual = layer(h, residual, cos_sin, fb)
            if i in capture:   # the layer's output: a new tensor (the next norm adds in place)
                fb.captured[i] = h + residual
    if stage is not None and not stage.is_last:
        return h, residual
    hidden, _ = model.norm(h, residual)
    if FINAL_HIDDEN in capture:
        fb.captured[FINAL_HIDDEN] = hidden
    return hidden


class PreNormDecoderLayer(nn.Module):
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor], cos_sin, fb: ForwardBatch):
        """h [T, hidden]: the previous layer's output not yet added to ``residual`` (None before
        the first layer). Returns the same pair for the next layer."""
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        x = self.self_attn(x, cos_sin, fb)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def norm_targets(self, prefix: str) -> Targets:
        return {f"{prefix}.{name}.weight": partial(copy_checked, getattr(self, name).weight,
                                                   name=f"{prefix}.{name}.weight")
                for name in ("input_layernorm", "post_attention_layernorm")}


class DecoderLM(nn.Module):
    """Model plugin contract (kvyard.model_base) around ``layers``; subclasses set them after
    ``super().__init__`` and implement ``layer_targets``."""

    is_generation = True

    def __init__(self, cfg: Any, ctx: Any, rotary_dim: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.dtype, ctx.device,
                                           prefix="model.embed_tokens", tp=ctx.tp)
        self.rotary = RotaryEmbedding(rope_config_from_hf(cfg, rotary_dim), ctx.dtype, ctx.device)
        self.layers = nn.ModuleList()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.tie = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, method=ctx.linear_method("lm_head"),
                              prefix="lm_head", dtype=ctx.dtype, device=ctx.device,
                              parallel=ColumnParallel(ctx.tp, (ctx.tp.split_padded(cfg.vocab_size),)))
        self.logits_head = LogitsHead(self.lm_head, vocab_size=cfg.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden] after the final norm."""
        return run_decoder_stack(self, input_ids, positions, fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        return self.logits_head(hidden)

    def input_embeddings(self) -> nn.Module:
        """The token embedding (draft heads share it: kvyard.model_base)."""
        return self.embed_tokens

    def layer_targets(self, prefix: str, layer: nn.Module) -> Targets:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """(HF name, tensor or QuantizedTensor) pairs; unknown names skipped, missing ones named."""
        targets: Targets = {
            "model.embed_tokens.weight": self._load_embedding,
            "model.norm.weight": partial(copy_checked, self.norm.weight, name="model.norm.weight"),
            "lm_head.weight": partial(self.lm_head.load_shard, 0),
        }
        for i, layer in enumerate(self.layers):
            targets.update(self.layer_targets(f"model.layers.{i}", layer))
        tied = {"lm_head.weight"} if self.tie else set()
        load_named(weights, targets, optional=tied)   # a tied lm_head is filled from the embedding
        for module in self.modules():
            if module is not self and hasattr(module, "process_after_loading"):
                module.process_after_loading()

    def _load_embedding(self, weight: Any) -> None:
        self.embed_tokens.load(weight, "model.embed_tokens.weight")
        if self.tie:
            # the lm_head gets the checkpoint entry itself, so a quantization method can keep it packed
            self.lm_head.load_shard(0, weight)
