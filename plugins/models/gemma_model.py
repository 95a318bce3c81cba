"""Gemma 2 and Gemma 3 (text) decoders.

Per step (T new tokens, H/Hkv heads, D head_dim; every norm is GemmaRMSNorm, x * (1 + w)):

    h = embed(input_ids) * sqrt(hidden)                   the embedding normalizer, in the model dtype
    per layer (sandwich norms: each sublayer's output is normed again before the residual add):
        a = post_attention_norm(attn(input_norm(h)))      h = h + a
        m = post_feedforward_norm(mlp(pre_feedforward_norm(h)))   h = h + m
        attn: q, k, v = qkv_proj(x); Gemma 3 norms q and k per head (q_norm / k_norm, [D]) first;
              rope; scores scaled by query_pre_attn_scalar^-0.5, soft-capped by
              attn_logit_softcapping (Gemma 2); sliding-window layers (layer_types) see the
              last sliding_window positions only
        mlp:  down_proj(gelu_tanh(gate) * up)             GeGLU
    hidden = norm(h)
    logits = final_logit_softcapping * tanh(lm_head(hidden) / final_logit_softcapping)   (when set)

Gemma 3's sliding and full layers rotate with their own rope settings (local / global base,
``rope_parameters`` per layer type): one RotaryEmbedding per layer type, looked up once per step.
The attention layers declare their windows and caps (kvyard.layers.attention), so the attention
backend serves them or refuses the model at start-up.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.activation import GeluAndMul
from kvyard.layers.attention import Attention, sliding_windows_from_hf
from kvyard.layers.embedding import VocabEmbedding
from kvyard.layers.linear import Linear, process_linears_after_loading
from kvyard.layers.logits import LogitsHead
from kvyard.layers.norm import GemmaRMSNorm
from kvyard.layers.rotary import RotaryEmbedding, rope_config_from_hf
from kvyard.layers.weights import load_named, param_target
from kvyard.model_base import ModelBuildContext

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


def _activation(cfg: Any) -> GeluAndMul:
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "gelu_pytorch_tanh")
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return GeluAndMul(_ACTIVATIONS[name])


def _linear(ctx: ModelBuildContext, prefix: str, in_features: int, out: int | list[int]) -> Linear:
    return Linear(in_features, out, bias=False, method=ctx.linear_method(prefix), prefix=prefix,
                  dtype=ctx.dtype, device=ctx.device)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: Any, layer_id: int, ctx: ModelBuildContext, prefix: str,
                 sliding_window: Optional[int], qk_norm: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if getattr(cfg, "attention_bias", False):
            raise ValueError("attention_bias=True is not supported for Gemma models")
        self.qkv_proj = _linear(ctx, f"{prefix}.qkv_proj", cfg.hidden_size, [q, kv, kv])
        self.o_proj = _linear(ctx, f"{prefix}.o_proj", q, cfg.hidden_size)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, ctx.dtype, ctx.device) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, ctx.dtype, ctx.device) if qk_norm else None
        self.attn = Attention(layer_id, self.heads, self.kv_heads, self.head_dim,
                              scaling=cfg.query_pre_attn_scalar ** -0.5, sliding_window=sliding_window,
                              logit_cap=getattr(cfg, "attn_logit_softcapping", None))

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.reshape(t, self.heads, self.head_dim)
        k = k.reshape(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.apply(q, cos_sin), RotaryEmbedding.apply(k, cos_sin)
        return self.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v, fb))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: Any, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = _linear(ctx, f"{prefix}.gate_up_proj", cfg.hidden_size, [inter, inter])
        self.down_proj = _linear(ctx, f"{prefix}.down_proj", inter, cfg.hidden_size)
        self.act = _activation(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")

    def __init__(self, cfg: Any, layer_id: int, ctx: ModelBuildContext, layer_type: str,
                 sliding_window: Optional[int], qk_norm: bool):
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.layer_type = layer_type
        for name in self.NORMS:
            setattr(self, name, GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device))
        self.self_attn = GemmaAttention(cfg, layer_id, ctx, f"{prefix}.self_attn", sliding_window, qk_norm)
        self.mlp = GemmaMLP(cfg, ctx, f"{prefix}.mlp")

    def forward(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                fb: ForwardBatch) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden] (the residual stream after this layer)."""
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos_sin, fb))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma2ForCausalLM(nn.Module):
    """Model plugin contract: see kvyard.model_base."""

    is_generation = True
    qk_norm = False          # Gemma 3 norms q and k per head

    def __init__(self, hf_config: Any, ctx: ModelBuildContext):
        super().__init__()
        cfg = self.config = hf_config
        num_layers = cfg.num_hidden_layers
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers)
        windows = sliding_windows_from_hf(cfg, num_layers)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, ctx.dtype, ctx.device,
                                           prefix="model.embed_tokens")
        # sqrt(hidden) rounded to the model dtype, as HF multiplies it (a buffer: graph-capturable)
        self.register_buffer("normalizer", torch.tensor(cfg.hidden_size ** 0.5, dtype=ctx.dtype,
                                                        device=ctx.device), persistent=False)
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(rope_config_from_hf(cfg, cfg.head_dim, t),
                                                        ctx.dtype, ctx.device) for t in sorted(set(types))})
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i, ctx, types[i], windows[i], self.qk_norm)
                                    for i in range(num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = _linear(ctx, "lm_head", cfg.hidden_size, cfg.vocab_size)
        self.logits_head = LogitsHead(self.lm_head, soft_cap=getattr(cfg, "final_logit_softcapping", None))

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden] after the final norm."""
        h = self.embed_tokens(input_ids) * self.normalizer
        cos_sin = {t: rope.lookup(positions) for t, rope in self.rotary.items()}
        for layer in self.layers:
            h = layer(h, cos_sin[layer.layer_type], fb)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], soft-capped when the config says so."""
        return self.logits_head(hidden)

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        optional = ("lm_head.weight",) if self.tie_word_embeddings else ()
        load_named(weights, self._checkpoint_targets(), optional)
        process_linears_after_loading(self)

    def _checkpoint_targets(self) -> dict[str, Callable[[Any], None]]:
        targets: dict[str, Callable[[Any], None]] = {
            "model.embed_tokens.weight": self._load_embedding,
            "model.norm.weight": param_target(self.norm.weight, "model.norm.weight"),
            "lm_head.weight": lambda w: self.lm_head.load_shard(0, w),
        }
        for i, layer in enumerate(self.layers):
            targets.update(_layer_targets(f"model.layers.{i}", layer))
        return targets

    def _load_embedding(self, weight: Any) -> None:
        self.embed_tokens.load(weight, "model.embed_tokens.weight")
        if self.tie_word_embeddings:
            self.lm_head.load_shard(0, weight)


def _layer_targets(prefix: str, layer: GemmaDecoderLayer) -> dict[str, Callable[[Any], None]]:
    attn, mlp = layer.self_attn, layer.mlp
    targets: dict[str, Callable[[Any], None]] = {}
    for linear, block, parts in ((attn.qkv_proj, "self_attn", ("q_proj", "k_proj", "v_proj")),
                                 (mlp.gate_up_proj, "mlp", ("gate_proj", "up_proj")),
                                 (attn.o_proj, "self_attn", ("o_proj",)), (mlp.down_proj, "mlp", ("down_proj",))):
        for shard, part in enumerate(parts):
            targets[f"{prefix}.{block}.{part}.weight"] = lambda w, linear=linear, shard=shard: linear.load_shard(shard, w)
    norms = [(name, getattr(layer, name)) for name in GemmaDecoderLayer.NORMS]
    if attn.q_norm is not None:
        norms += [("self_attn.q_norm", attn.q_norm), ("self_attn.k_norm", attn.k_norm)]
    for name, norm in norms:
        targets[f"{prefix}.{name}.weight"] = param_target(norm.weight, f"{prefix}.{name}.weight")
    return targets


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model: Gemma 2 plus q/k norms and per-layer-type rope; its configs leave
    the soft-caps unset (None), which the shared code then skips."""
    qk_norm = True
