"""BERT / XLM-RoBERTa encoders: embedding models and cross-encoder classifiers.

Encoders attend bidirectionally over the whole prompt and need no KV cache, so attention is
computed here per request with SDPA instead of through the paged attention backend; the
scheduler gives embedding requests their whole prompt in one step (no chunking, no prefix).
Shapes: T tokens of B requests, hidden H, heads h x d.

    x = LayerNorm(word(ids) + position(pos + offset) + token_type(types))
        offset: 0 for BERT; padding_idx + 1 for XLM-RoBERTa (its positions start there)
        types:  fb.extras["token_type_ids"] [T] for text pairs (cross-encoders), else 0
    per layer: x = LN(x + attn(x)); x = LN(x + out(gelu(inter(x))))

Heads (what ``pool`` returns, [B, ...] float32):
  BertEmbeddingModel / XLMRobertaModel        ``self.pooling`` (mean + L2 norm unless the
                                              folder's sentence-transformers files say otherwise)
  BertForSequenceClassification               classifier(tanh(pooler(x[CLS])))  [B, num_labels]
  XLMRobertaForSequenceClassification         out_proj(tanh(dense(x[<s>])))     [B, num_labels]
Scores are the raw logits, as transformers returns them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.linear import Linear, process_linears_after_loading
from kvyard.layers.weights import load_named, param_target
from kvyard.model_base import ModelBuildContext
from kvyard.model.pooling import PoolingConfig, pool

Loaders = dict[str, Callable[[Any], None]]


def _linear(ctx: ModelBuildContext, prefix: str, in_features: int, out: int | list[int]) -> Linear:
    return Linear(in_features, out, bias=True, method=ctx.linear_method(prefix), prefix=prefix,
                  dtype=ctx.dtype, device=ctx.device)


def _linear_targets(name: str, linear: Linear, shard: int = 0) -> Loaders:
    return {f"{name}.weight": lambda w: linear.load_shard(shard, w),
            f"{name}.bias": lambda b: linear.load_bias_shard(shard, b)}


def _layer_norm_targets(name: str, norm: nn.LayerNorm) -> Loaders:
    return {f"{name}.weight": param_target(norm.weight, f"{name}.weight"),
            f"{name}.bias": param_target(norm.bias, f"{name}.bias")}


class BertLayer(nn.Module):
    def __init__(self, cfg: Any, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        h, inter = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_attention_heads
        self.qkv = _linear(ctx, f"{prefix}.attention.self.qkv", h, [h, h, h])
        self.attn_out = _linear(ctx, f"{prefix}.attention.output.dense", h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, dtype=ctx.dtype)
        self.inter = _linear(ctx, f"{prefix}.intermediate.dense", h, inter)
        self.out = _linear(ctx, f"{prefix}.output.dense", inter, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, dtype=ctx.dtype)

    def forward(self, x: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv.split(self.qkv(x))
        attn = torch.empty_like(q)
        start = 0
        for n in fb.extend_seq_lens_cpu:   # bidirectional attention within each request
            rows = slice(start, start + n)
            heads = [t[rows].view(n, self.num_heads, -1).transpose(0, 1) for t in (q, k, v)]
            attn[rows] = F.scaled_dot_product_attention(*heads).transpose(0, 1).reshape(n, -1)
            start += n
        x = self.attn_norm(x + self.attn_out(attn))
        return self.out_norm(x + self.out(F.gelu(self.inter(x))))

    def targets(self, p: str) -> Loaders:
        out: Loaders = {}
        for shard, name in enumerate(("query", "key", "value")):
            out.update(_linear_targets(f"{p}.attention.self.{name}", self.qkv, shard))
        out.update(_linear_targets(f"{p}.attention.output.dense", self.attn_out))
        out.update(_linear_targets(f"{p}.intermediate.dense", self.inter))
        out.update(_linear_targets(f"{p}.output.dense", self.out))
        out.update(_layer_norm_targets(f"{p}.attention.output.LayerNorm", self.attn_norm))
        out.update(_layer_norm_targets(f"{p}.output.LayerNorm", self.out_norm))
        return out


class BertEncoder(nn.Module):
    """Embeddings + layers; checkpoint names relative to the encoder (no "bert." prefix)."""

    def __init__(self, cfg: Any, ctx: ModelBuildContext, position_offset: int = 0):
        super().__init__()
        h = cfg.hidden_size
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {cfg.position_embedding_type!r} is not supported")
        self.position_offset = position_offset
        self.word = nn.Embedding(cfg.vocab_size, h, dtype=ctx.dtype)
        self.position = nn.Embedding(cfg.max_position_embeddings, h, dtype=ctx.dtype)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h, dtype=ctx.dtype)
        self.emb_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, dtype=ctx.dtype)
        self.layers = nn.ModuleList(BertLayer(cfg, ctx, f"encoder.layer.{i}") for i in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        types = fb.extras.get("token_type_ids")
        type_rows = self.token_type(types) if types is not None else self.token_type.weight[0]
        x = self.word(input_ids) + self.position(positions + self.position_offset) + type_rows
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, fb)
        return x

    def targets(self) -> Loaders:
        out: Loaders = {
            "embeddings.word_embeddings.weight": param_target(self.word.weight, "embeddings.word_embeddings.weight"),
            "embeddings.position_embeddings.weight": param_target(self.position.weight,
                                                                  "embeddings.position_embeddings.weight"),
            "embeddings.token_type_embeddings.weight": param_target(self.token_type.weight,
                                                                    "embeddings.token_type_embeddings.weight"),
            **_layer_norm_targets("embeddings.LayerNorm", self.emb_norm),
        }
        for i, layer in enumerate(self.layers):
            out.update(layer.targets(f"encoder.layer.{i}"))
        return out


class BertEmbeddingModel(nn.Module):
    """Model plugin contract: see kvyard.model_base."""

    is_generation = False
    encoder_prefix = "bert."          # stripped from checkpoint names (task-head checkpoints)

    def __init__(self, cfg: Any, ctx: ModelBuildContext):
        super().__init__()
        self.pooling = PoolingConfig(method="mean", normalize=True)
        self.encoder = BertEncoder(cfg, ctx, self.position_offset(cfg))

    @classmethod
    def position_offset(cls, cfg: Any) -> int:
        return 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return self.encoder(input_ids, positions, fb)

    def pool(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """[B, hidden] per ``self.pooling``."""
        return pool(hidden, fb, self.pooling)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("encoder models do not generate text")

    def head_targets(self) -> Loaders:
        """Checkpoint names (full, with their prefix) of the task head; none for embeddings."""
        return {}

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        targets = {**{self.encoder_prefix + n: f for n, f in self.encoder.targets().items()},
                   **self.head_targets()}
        # checkpoints saved from the bare model carry no prefix: give them the prefix
        load_named(((n if n in targets else self.encoder_prefix + n, t) for n, t in weights), targets)
        process_linears_after_loading(self)


def _num_labels(cfg: Any) -> int:
    labels = int(getattr(cfg, "num_labels", 0) or 0)
    if labels <= 0:
        raise ValueError(f"num_labels must be positive, got {labels}")
    return labels


def _first_tokens(hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
    """hidden [T, H] of whole prompts -> each prompt's first token ([CLS] / <s>) [B, H]."""
    return torch.stack([chunk[0] for chunk in hidden.split(fb.extend_seq_lens_cpu)])


class BertForSequenceClassification(BertEmbeddingModel):
    """Cross-encoders / classifiers: the [CLS] token through the pooler (dense + tanh), then
    the classifier; ``pool`` returns the raw logits [B, num_labels]."""

    def __init__(self, cfg: Any, ctx: ModelBuildContext):
        super().__init__(cfg, ctx)
        self.pooler = _linear(ctx, "bert.pooler.dense", cfg.hidden_size, cfg.hidden_size)
        self.classifier = _linear(ctx, "classifier", cfg.hidden_size, _num_labels(cfg))

    def pool(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(_first_tokens(hidden, fb)))).float()

    def head_targets(self) -> Loaders:
        return {**_linear_targets("bert.pooler.dense", self.pooler), **_linear_targets("classifier", self.classifier)}


class XLMRobertaModel(BertEmbeddingModel):
    """XLM-RoBERTa (BGE-M3 and friends): BERT's layers; positions start at padding_idx + 1."""

    encoder_prefix = "roberta."

    @classmethod
    def position_offset(cls, cfg: Any) -> int:
        return int(cfg.pad_token_id) + 1


class XLMRobertaForSequenceClassification(XLMRobertaModel):
    """Cross-encoders (bge-reranker style): the <s> token through dense + tanh + out_proj;
    ``pool`` returns the raw logits [B, num_labels]."""

    def __init__(self, cfg: Any, ctx: ModelBuildContext):
        super().__init__(cfg, ctx)
        self.dense = _linear(ctx, "classifier.dense", cfg.hidden_size, cfg.hidden_size)
        self.out_proj = _linear(ctx, "classifier.out_proj", cfg.hidden_size, _num_labels(cfg))

    def pool(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(_first_tokens(hidden, fb)))).float()

    def head_targets(self) -> Loaders:
        return {**_linear_targets("classifier.dense", self.dense),
                **_linear_targets("classifier.out_proj", self.out_proj)}
