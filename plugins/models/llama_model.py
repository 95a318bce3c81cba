"""The Llama-family decoder: Llama 2/3 (and SmolLM, which ships as LlamaForCausalLM), Mistral, Qwen2;
Qwen3 (qwen3_model.py) and Phi-3 (phi3_model.py) are variants of it.

They share one graph and differ in which projections carry a bias, in sliding-window attention
(per layer, from the config: kvyard.layers.attention.sliding_windows_from_hf), and in what the
variants override (the attention module, checkpoint names). Per step the model does (T new
tokens, H/Hkv heads, D head_dim):

    h = embed(input_ids)                                  [T, hidden]
    cos_sin = rotary.lookup(positions)                    once, shared by every layer
    per layer:  x, residual = input_norm(h, residual)     fused residual add
                qkv = qkv_proj(x)                         [T, (H + 2 Hkv) D]
                q|k rotated together as [T, H + Hkv, D], attention over the paged KV
                x, residual = post_norm(o_proj(attn), residual)
                h = down_proj(silu(gate) * up)
    hidden = norm(h, residual)                            [T, hidden]

Tensor parallelism (``ctx.tp``, kvyard.model_base): each rank holds H / tp query heads and its
KV heads (split, or one replicated), so ``qkv`` above is [T, (H_r + 2 Hkv_r) D]; o_proj and
down_proj are row-parallel (all-reduced), the embedding and lm_head vocabulary-parallel.
Pipeline parallelism (``ctx.pp``): a stage builds and loads only its layers (the embedding on
the first stage, the final norm and lm_head on the last; kvyard.model_base).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.activation import SiluAndMul
from kvyard.layers.attention import Attention, sliding_windows_from_hf
from kvyard.layers.decoder import PipelineLayer, PreNormDecoderLayer, run_decoder_stack
from kvyard.layers.embedding import VocabEmbedding
from kvyard.layers.linear import Linear, process_linears_after_loading
from kvyard.layers.lowering import LoweredDecoder, LoweredLayer
from kvyard.layers.logits import LogitsHead
from kvyard.layers.norm import RMSNorm
from kvyard.layers.parallel import ColumnParallel, RowParallel
from kvyard.layers.rotary import RotaryEmbedding, rope_config_from_hf
from kvyard.layers.weights import copy_checked, load_named
from kvyard.model_base import ModelBuildContext


@dataclass(frozen=True)
class LlamaDims:
    """The sizes the graph needs, read once from the HF config and checked."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_dims(cfg: Any, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> LlamaDims:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return LlamaDims(
        hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias)


class LlamaAttention(nn.Module):
    def __init__(self, dims: LlamaDims, layer_id: int, ctx: ModelBuildContext, prefix: str,
                 sliding_window: Optional[int] = None):
        super().__init__()
        self.dims = dims
        heads = ctx.tp.split(dims.num_heads, "num_attention_heads")
        kv_heads = ctx.tp.split_kv_heads(dims.num_kv_heads)
        # this rank's heads: the sizes forward uses
        self.num_heads, self.num_kv_heads, self.head_dim = heads.size, kv_heads.size, dims.head_dim
        self.q_size, self.kv_size = heads.size * dims.head_dim, kv_heads.size * dims.head_dim
        d = dims.head_dim
        self.qkv_proj = Linear(dims.hidden_size, [dims.q_size, dims.kv_size, dims.kv_size],
                               bias=dims.qkv_bias, method=ctx.linear_method(f"{prefix}.qkv_proj"),
                               prefix=f"{prefix}.qkv_proj", dtype=ctx.dtype, device=ctx.device,
                               parallel=ColumnParallel(ctx.tp, (heads * d, kv_heads * d, kv_heads * d)))
        self.o_proj = Linear(dims.q_size, dims.hidden_size, bias=dims.o_bias,
                             method=ctx.linear_method(f"{prefix}.o_proj"), prefix=f"{prefix}.o_proj",
                             dtype=ctx.dtype, device=ctx.device, parallel=RowParallel(ctx.tp))
        kv_index = layer_id - ctx.pp.layers(dims.num_layers).start   # the stage's KV pool counts from 0
        self.attn = Attention(kv_index, self.num_heads, self.num_kv_heads, dims.head_dim,
                              sliding_window=sliding_window)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                fb: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)                                  # [T, q | k | v]
        # q and k are adjacent columns: rotated as one [T, H + Hkv, D] view (with the KV write
        # where the pool can). Split views, not slices: a decode step runs this per layer, and
        # each tensor op costs dispatch time.
        qk, v = qkv.split_with_sizes((self.q_size + self.kv_size, self.kv_size), dim=1)
        return self.o_proj(self.attn.forward_rotary(qk, v, cos_sin, fb))


class LlamaMLP(nn.Module):
    def __init__(self, dims: LlamaDims, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        inter = dims.intermediate_size
        self.gate_up_proj = Linear(dims.hidden_size, [inter, inter], bias=dims.mlp_bias,
                                   method=ctx.linear_method(f"{prefix}.gate_up_proj"),
                                   prefix=f"{prefix}.gate_up_proj", dtype=ctx.dtype, device=ctx.device,
                                   parallel=ColumnParallel(ctx.tp))
        self.down_proj = Linear(inter, dims.hidden_size, bias=dims.mlp_bias,
                                method=ctx.linear_method(f"{prefix}.down_proj"),
                                prefix=f"{prefix}.down_proj", dtype=ctx.dtype, device=ctx.device,
                                parallel=RowParallel(ctx.tp))
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, dims: LlamaDims, layer_id: int, ctx: ModelBuildContext,
                 attention_cls: type = LlamaAttention, sliding_window: Optional[int] = None):
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.input_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, ctx.dtype, ctx.device)
        self.self_attn = attention_cls(dims, layer_id, ctx, f"{prefix}.self_attn", sliding_window)
        self.post_attention_layernorm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, ctx.dtype, ctx.device)
        self.mlp = LlamaMLP(dims, ctx, f"{prefix}.mlp")


class LlamaModel(nn.Module):
    def __init__(self, hf_config: Any, dims: LlamaDims, ctx: ModelBuildContext,
                 attention_cls: type = LlamaAttention):
        super().__init__()
        self.pp_stage = ctx.pp
        self.embed_tokens = (VocabEmbedding(dims.vocab_size, dims.hidden_size, ctx.dtype, ctx.device,
                                            prefix="model.embed_tokens", tp=ctx.tp) if ctx.pp.is_first else None)
        self.rotary = RotaryEmbedding(rope_config_from_hf(hf_config, dims.head_dim), ctx.dtype, ctx.device)
        windows = sliding_windows_from_hf(hf_config, dims.num_layers)
        mine = ctx.pp.layers(dims.num_layers)
        self.layers = nn.ModuleList(LlamaDecoderLayer(dims, i, ctx, attention_cls, windows[i]) if i in mine
                                    else PipelineLayer() for i in range(dims.num_layers))
        self.norm = RMSNorm(dims.hidden_size, dims.rms_norm_eps, ctx.dtype, ctx.device) if ctx.pp.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return run_decoder_stack(self, input_ids, positions, fb)


class LlamaForCausalLM(nn.Module):
    """Model plugin contract: see kvyard.model_base."""

    is_generation = True
    supports_tensor_parallel = True
    supports_pipeline_parallel = True
    attention_cls: type = LlamaAttention   # a variant's attention module (same constructor)

    def __init__(self, hf_config: Any, ctx: ModelBuildContext):
        super().__init__()
        self.config = hf_config
        self.dims = read_dims(hf_config, *self.biases(hf_config))
        self.tp, self.pp = ctx.tp, ctx.pp
        self.model = LlamaModel(hf_config, self.dims, ctx, self.attention_cls)
        if ctx.pp.is_last:
            self._init_head(hf_config, ctx)

    def _init_head(self, hf_config: Any, ctx: ModelBuildContext) -> None:
        vocab = self.dims.vocab_size
        self.lm_head = Linear(self.dims.hidden_size, vocab, bias=False,
                              method=ctx.linear_method("lm_head"), prefix="lm_head",
                              dtype=ctx.dtype, device=ctx.device,
                              parallel=ColumnParallel(ctx.tp, (ctx.tp.split_padded(vocab),)))
        self.logits_head = LogitsHead(self.lm_head, vocab_size=vocab)

    # -- architecture differences ------------------------------------------------------------
    @classmethod
    def biases(cls, cfg: Any) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o_proj bias, mlp bias)."""
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return attention_bias, attention_bias, bool(getattr(cfg, "mlp_bias", False))

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, hidden] after the final norm."""
        return self.model(input_ids, positions, fb)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        return self.logits_head(hidden)

    def input_embeddings(self) -> nn.Module:
        """The token embedding (draft heads share it: kvyard.model_base)."""
        return self.model.embed_tokens
    def lowered_decoder(self) -> Optional[LoweredDecoder]:
        """The decode step as kvyard.layers.lowering's graph, for the plain Llama layers only:
        a variant with its own model, layer, attention or MLP module keeps the Python step."""
        m = self.model
        plain = type(m) is LlamaModel and type(self).forward is LlamaForCausalLM.forward and all(
            type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
            and type(layer.mlp) is LlamaMLP for layer in m.layers)
        if not plain:
            return None
        return LoweredDecoder(m.embed_tokens, m.rotary, tuple(
            LoweredLayer(layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.qkv_proj,
                         layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj, layer.self_attn.attn)
            for layer in m.layers), m.norm,
            self.logits_head if type(self).compute_logits is LlamaForCausalLM.compute_logits else None)

    # -- weights -----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Consumes (HF name, tensor or QuantizedTensor) pairs. Unknown names (rotary inv_freq,
        ...) are skipped; a weight the model needs and never received is an error naming it.
        Which tensors a projection needs (weight, or qweight/scales/..., weight_scale, ...) is
        its quantization method's ``checkpoint_names``."""
        targets, optional = self._checkpoint_targets()
        # with tied embeddings the lm_head is filled from the embedding when the checkpoint lacks it
        tied = ("lm_head.weight",) if self.dims.tie_word_embeddings else ()
        load_named(weights, {**optional, **targets}, optional=[*optional, *tied])
        process_linears_after_loading(self)

    def _checkpoint_targets(self) -> tuple[dict[str, Callable[[Any], None]], dict[str, Callable[[Any], None]]]:
        """(required, optional): HF checkpoint name -> the call that loads it."""
        targets: dict[str, Callable[[Any], None]] = {}
        optional: dict[str, Callable[[Any], None]] = {}
        if self.pp.is_first or (self.pp.is_last and self.dims.tie_word_embeddings):
            targets["model.embed_tokens.weight"] = self._load_embedding
        if self.pp.is_last:
            targets["model.norm.weight"] = partial(copy_checked, self.model.norm.weight, name="model.norm.weight")
            head, optional = self._head_targets()
            targets.update(head)
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer, PipelineLayer):
                continue   # another stage's
            required, opt = self._layer_targets(f"model.layers.{i}", layer)
            targets.update(required)
            optional.update(opt)
        return targets, optional

    def _head_targets(self) -> tuple[dict[str, Callable[[Any], None]], dict[str, Callable[[Any], None]]]:
        """(required, optional) checkpoint names of the LM head -> loaders."""
        return self.lm_head.checkpoint_targets(["lm_head"])

    def _layer_targets(self, prefix: str, layer: LlamaDecoderLayer):
        """(required, optional) checkpoint names of one layer -> loaders; variants add or rename entries."""
        return _layer_targets(prefix, layer)

    def _load_embedding(self, weight: Any) -> None:
        if self.model.embed_tokens is not None:
            self.model.embed_tokens.load(weight, "model.embed_tokens.weight")
        if self.dims.tie_word_embeddings and self.pp.is_last:
            # the lm_head gets the checkpoint entry itself, so a quantization method can keep it packed
            self.lm_head.load_shard(0, weight)


def _layer_targets(prefix: str, layer: LlamaDecoderLayer):
    """(required, optional) checkpoint name -> loader maps of one decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (
        (attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        (mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
        (attn.o_proj, ("self_attn.o_proj",)),
        (mlp.down_proj, ("mlp.down_proj",)),
    )
    targets: dict[str, Callable[[Any], None]] = {}
    optional: dict[str, Callable[[Any], None]] = {}
    for linear, parts in linears:
        required, opt = linear.checkpoint_targets([f"{prefix}.{part}" for part in parts])
        targets.update(required)
        optional.update(opt)
    for which in ("k", "v"):   # fp8 KV-cache scales: llm-compressor's name, and the older one on k/v_proj
        load = partial(attn.attn.load_kv_scale, which)
        optional[f"{prefix}.self_attn.{which}_scale"] = load
        optional[f"{prefix}.self_attn.{which}_proj.{which}_scale"] = load
    for name in ("input_layernorm", "post_attention_layernorm"):
        param = getattr(layer, name).weight
        targets[f"{prefix}.{name}.weight"] = partial(copy_checked, param, name=f"{prefix}.{name}.weight")
    return targets, optional


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def biases(cls, cfg: Any) -> tuple[bool, bool, bool]:
        return False, False, False


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def biases(cls, cfg: Any) -> tuple[bool, bool, bool]:
        return True, False, False


class LlamaForSequenceClassification(LlamaForCausalLM):
    """Reward / classification models: the decoder, then ``score`` [num_labels, hidden] on each
    prompt's last token (HF's pooling when there is no padding). Served as an embedding model:
    ``pool`` returns the raw scores [B, num_labels] (no activation), as HF's logits."""

    is_generation = False
    supports_pipeline_parallel = False

    def _init_head(self, hf_config: Any, ctx: ModelBuildContext) -> None:
        labels = int(getattr(hf_config, "num_labels", 0) or 0)
        if labels <= 0:
            raise ValueError(f"num_labels must be positive, got {labels}")
        self.score = Linear(self.dims.hidden_size, labels, bias=False, method=ctx.linear_method("score"),
                            prefix="score", dtype=ctx.dtype, device=ctx.device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("sequence-classification models do not generate text")

    def pool(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """hidden [T, hidden] of whole prompts -> scores [B, num_labels] float32."""
        last = torch.stack([chunk[-1] for chunk in hidden.split(fb.extend_seq_lens_cpu)])
        return self.score(last).float()

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        targets, optional = self._checkpoint_targets()
        load_named(weights, {**optional, **targets}, optional=list(optional))
        process_linears_after_loading(self)

    def _head_targets(self):
        return self.score.checkpoint_targets(["score"])

    def _load_embedding(self, weight: Any) -> None:
        self.model.embed_tokens.load(weight, "model.embed_tokens.weight")


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    @classmethod
    def biases(cls, cfg: Any) -> tuple[bool, bool, bool]:
        return Qwen2ForCausalLM.biases(cfg)
