"""BERT encoder as an embedding model (sentence-transformers style: mean pooling + L2 norm by
default; the model folder's sentence-transformers files override ``pooling``, kvyard.pooling).

Encoders attend bidirectionally over the whole prompt and need no KV cache, so attention is
computed here per request with SDPA instead of through the paged attention backend; the
scheduler gives embedding requests their whole prompt in one step (no chunking).
Shapes: T tokens of B requests, hidden H, heads h x d.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.linear import Linear
from kvyard.model_base import ModelBuildContext
from kvyard.pooling import PoolingConfig, pool


class BertLayer(nn.Module):
    def __init__(self, cfg: Any, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        h, inter = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_attention_heads
        lin = lambda i, o, name: Linear(i, o, bias=True, method=ctx.linear_method(f"{prefix}.{name}"),
                                        prefix=f"{prefix}.{name}", dtype=ctx.dtype, device=ctx.device)
        self.qkv = lin(h, [h, h, h], "attention.self.qkv")
        self.attn_out = lin(h, h, "attention.output.dense")
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, dtype=ctx.dtype)
        self.inter = lin(h, inter, "intermediate.dense")
        self.out = lin(inter, h, "output.dense")
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


class BertEmbeddingModel(nn.Module):
    is_generation = False

    def __init__(self, cfg: Any, ctx: ModelBuildContext):
        super().__init__()
        self.pooling = PoolingConfig(method="mean", normalize=True)
        h = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, h, dtype=ctx.dtype)
        self.position = nn.Embedding(cfg.max_position_embeddings, h, dtype=ctx.dtype)
        self.token_type = nn.Embedding(cfg.type_vocab_size, h, dtype=ctx.dtype)
        self.emb_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, dtype=ctx.dtype)
        self.layers = nn.ModuleList(BertLayer(cfg, ctx, f"encoder.layer.{i}") for i in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, fb)
        return x

    def pool(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """[B, hidden] per ``self.pooling`` (mean + L2 norm unless the folder says otherwise)."""
        return pool(hidden, fb, self.pooling)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("BERT embedding models do not generate text")

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        params = {
            "embeddings.word_embeddings.weight": self.word.weight,
            "embeddings.position_embeddings.weight": self.position.weight,
            "embeddings.token_type_embeddings.weight": self.token_type.weight,
            "embeddings.LayerNorm.weight": self.emb_norm.weight, "embeddings.LayerNorm.bias": self.emb_norm.bias,
        }
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            params.update({p + "attention.output.LayerNorm.weight": layer.attn_norm.weight,
                           p + "attention.output.LayerNorm.bias": layer.attn_norm.bias,
                           p + "output.LayerNorm.weight": layer.out_norm.weight,
                           p + "output.LayerNorm.bias": layer.out_norm.bias})
        linears = {}
        for i, layer in enumerate(self.layers):
            p = f"encoder.layer.{i}."
            for j, name in enumerate(("query", "key", "value")):
                linears[f"{p}attention.self.{name}"] = (layer.qkv, j)
            linears[p + "attention.output.dense"] = (layer.attn_out, 0)
            linears[p + "intermediate.dense"] = (layer.inter, 0)
            linears[p + "output.dense"] = (layer.out, 0)
        seen = set()
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            base, _, kind = name.rpartition(".")
            if name in params:
                params[name].data.copy_(_dense(tensor))
                seen.add(name)
            elif base in linears and kind in ("weight", "bias"):
                layer, shard = linears[base]
                (layer.load_shard if kind == "weight" else layer.load_bias_shard)(shard, _dense(tensor))
                seen.add(name)
        missing = [n for n in params if n not in seen] + \
                  [f"{b}.{k}" for b in linears for k in ("weight", "bias") if f"{b}.{k}" not in seen]
        if missing:
            raise ValueError(f"checkpoint is missing {missing[0]} (and {len(missing) - 1} more)")
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_after_loading()


def _dense(t: Any) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.dequantize()
