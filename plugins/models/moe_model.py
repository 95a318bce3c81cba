"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

One graph; per-architecture facts live in an ``MoeSpec`` (read from the HF config):

    h = embed(input_ids)                                       [T, hidden]
    per layer:  x, residual = input_norm(h, residual)
                q, k, v = qkv_proj(x)                          (+ bias: Qwen2-MoE)
                OLMoE: q, k = rms(q), rms(k) over the whole projection; clip_qkv clamps q, k, v
                Qwen3-MoE: q, k = rms per head
                rotate q, k; attention over the paged KV; o_proj
                x, residual = post_norm(attn, residual)
                h = sparse MoE block (kvyard.layers.moe) or a dense MLP (Qwen's mlp_only_layers /
                    decoder_sparse_step)
    hidden = norm(h, residual)

Routing (kvyard.layers.moe.select_experts): softmax over float32 router logits, top-k;
renormalised always for Mixtral, per norm_topk_prob for the others; Qwen2-MoE adds its shared
expert times sigmoid(shared_expert_gate(x)). Sliding-window attention is not applied (a warning
says so, as the llama plugin does): exact for sequences up to the window.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.layers.attention import Attention
from kvyard.layers.decoder import DecoderLM, PreNormDecoderLayer
from kvyard.layers.linear import Linear
from kvyard.layers.mlp import GatedMLP
from kvyard.layers.moe import FusedMoE, Router, RoutingConfig, SparseMoeBlock
from kvyard.layers.norm import RMSNorm
from kvyard.layers.parallel import ColumnParallel, RowParallel
from kvyard.layers.rotary import RotaryEmbedding
from kvyard.layers.weights import copy_checked
from kvyard.model_base import ModelBuildContext

logger = logging.getLogger(__name__)

Targets = dict[str, Callable[[Any], None]]


@dataclass(frozen=True)
class MoeSpec:
    """What differs between the four architectures."""
    mlp_name: str                       # checkpoint block name: "mlp" or "block_sparse_moe"
    expert_parts: tuple[str, str, str]  # checkpoint names of (gate, up, down) per expert
    qkv_bias: bool
    o_bias: bool
    qk_norm: Optional[str]              # None, "head" (Qwen3-MoE) or "full" (OLMoE)
    clip_qkv: Optional[float]
    renormalize: bool
    shared_expert_size: int             # 0: none; else Qwen2-MoE's gated shared expert
    router_weights_dtype: bool          # round routing weights to the model dtype (all but Mixtral)


class MoeAttention(nn.Module):
    def __init__(self, cfg: Any, spec: MoeSpec, layer_id: int, ctx: ModelBuildContext, prefix: str):
        super().__init__()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        d = self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        local_q, local_kv = ctx.tp.split(heads, "num_attention_heads"), ctx.tp.split_kv_heads(kv_heads)
        self.heads, self.kv_heads = local_q.size, local_kv.size           # this rank's heads
        self.q_size, self.kv_size = self.heads * d, self.kv_heads * d
        self.spec = spec
        lin = dict(dtype=ctx.dtype, device=ctx.device)
        self.qkv_proj = Linear(cfg.hidden_size, [heads * d, kv_heads * d, kv_heads * d], bias=spec.qkv_bias,
                               method=ctx.linear_method(f"{prefix}.qkv_proj"), prefix=f"{prefix}.qkv_proj",
                               parallel=ColumnParallel(ctx.tp, (local_q * d, local_kv * d, local_kv * d)), **lin)
        self.o_proj = Linear(heads * d, cfg.hidden_size, bias=spec.o_bias,
                             method=ctx.linear_method(f"{prefix}.o_proj"), prefix=f"{prefix}.o_proj",
                             parallel=RowParallel(ctx.tp), **lin)
        if spec.qk_norm is not None:
            q_width, k_width = ((self.head_dim, self.head_dim) if spec.qk_norm == "head"
                                else (self.q_size, self.kv_size))
            self.q_norm = RMSNorm(q_width, cfg.rms_norm_eps, ctx.dtype, ctx.device)
            self.k_norm = RMSNorm(k_width, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.attn = Attention(layer_id, self.heads, self.kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos_sin, fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))              # [T, q], [T, kv], [T, kv]
        if self.spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.spec.clip_qkv is not None:
            c = self.spec.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.reshape(t, self.heads, self.head_dim)
        k = k.reshape(t, self.kv_heads, self.head_dim)
        if self.spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = RotaryEmbedding.apply(q, cos_sin)
        k = RotaryEmbedding.apply(k, cos_sin)
        return self.o_proj(self.attn(q.reshape(t, -1), k.reshape(t, -1), v.contiguous(), fb))


def build_sparse_block(cfg: Any, spec: MoeSpec, ctx: ModelBuildContext, prefix: str) -> SparseMoeBlock:
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    routing = RoutingConfig(num_experts=experts, top_k=cfg.num_experts_per_tok, renormalize=spec.renormalize,
                            weights_dtype=ctx.dtype if spec.router_weights_dtype else None)
    router = Router(cfg.hidden_size, experts, ctx.dtype, ctx.device)
    shared = gate = None
    if spec.shared_expert_size:
        shared = GatedMLP(cfg.hidden_size, spec.shared_expert_size, ctx, f"{prefix}.shared_expert")
        gate = Linear(cfg.hidden_size, 1, method=ctx.linear_method(f"{prefix}.shared_expert_gate"),
                      prefix=f"{prefix}.shared_expert_gate", dtype=ctx.dtype, device=ctx.device)
    return SparseMoeBlock(routing, router, FusedMoE(experts, cfg.hidden_size, inter, ctx, f"{prefix}.experts"),
                          shared, gate)


def is_sparse_layer(cfg: Any, layer_id: int) -> bool:
    """Qwen-MoE's mlp_only_layers / decoder_sparse_step; every layer elsewhere."""
    if layer_id in (getattr(cfg, "mlp_only_layers", None) or []):
        return False
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return (layer_id + 1) % step == 0


class MoeDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: Any, spec: MoeSpec, layer_id: int, ctx: ModelBuildContext):
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.self_attn = MoeAttention(cfg, spec, layer_id, ctx, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        mlp_prefix = f"{prefix}.{spec.mlp_name}"
        self.mlp = (build_sparse_block(cfg, spec, ctx, mlp_prefix) if is_sparse_layer(cfg, layer_id)
                    else GatedMLP(cfg.hidden_size, cfg.intermediate_size, ctx, mlp_prefix))


class MoeForCausalLM(DecoderLM):
    """Model plugin contract: see kvyard.model_base. Subclasses give ``spec(cfg)``."""

    supports_tensor_parallel = True

    @classmethod
    def spec(cls, cfg: Any) -> MoeSpec:
        raise NotImplementedError

    def __init__(self, hf_config: Any, ctx: ModelBuildContext):
        cfg = hf_config
        super().__init__(cfg, ctx, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.moe_spec = self.spec(cfg)
        _warn_sliding_window(type(self).__name__, cfg)
        self.layers.extend(MoeDecoderLayer(cfg, self.moe_spec, i, ctx) for i in range(cfg.num_hidden_layers))

    def layer_targets(self, prefix: str, layer: MoeDecoderLayer) -> Targets:
        attn = layer.self_attn
        targets: Targets = {}
        for shard, part in enumerate(("q_proj", "k_proj", "v_proj")):
            targets[f"{prefix}.self_attn.{part}.weight"] = partial(attn.qkv_proj.load_shard, shard)
            if attn.qkv_proj.bias is not None:
                targets[f"{prefix}.self_attn.{part}.bias"] = partial(attn.qkv_proj.load_bias_shard, shard)
        targets[f"{prefix}.self_attn.o_proj.weight"] = partial(attn.o_proj.load_shard, 0)
        if attn.o_proj.bias is not None:
            targets[f"{prefix}.self_attn.o_proj.bias"] = partial(attn.o_proj.load_bias_shard, 0)
        targets.update(layer.norm_targets(prefix))
        if self.moe_spec.qk_norm is not None:
            for name, param in (("self_attn.q_norm", attn.q_norm.weight), ("self_attn.k_norm", attn.k_norm.weight)):
                targets[f"{prefix}.{name}.weight"] = partial(copy_checked, param, name=f"{prefix}.{name}.weight")
        mlp_prefix = f"{prefix}.{self.moe_spec.mlp_name}"
        if isinstance(layer.mlp, GatedMLP):
            targets.update(layer.mlp.targets(mlp_prefix))
        else:
            targets.update(layer.mlp.targets(mlp_prefix, self.moe_spec.expert_parts))
        return targets


def _warn_sliding_window(arch: str, cfg: Any) -> None:
    window = getattr(cfg, "sliding_window", None)
    if window is None or not getattr(cfg, "use_sliding_window", True):
        return
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is None or window < limit:
        logger.warning("%s: sliding_window=%d is not applied; attention is full, which matches the "
                       "reference only for sequences up to %d tokens", arch, window, window)


def _qwen_shared(cfg: Any) -> int:
    return int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)


class MixtralForCausalLM(MoeForCausalLM):
    @classmethod
    def spec(cls, cfg: Any) -> MoeSpec:
        return MoeSpec("block_sparse_moe", ("w1", "w3", "w2"), False, False, None, None,
                       renormalize=True, shared_expert_size=0, router_weights_dtype=False)


class Qwen2MoeForCausalLM(MoeForCausalLM):
    @classmethod
    def spec(cls, cfg: Any) -> MoeSpec:
        return MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj"), bool(getattr(cfg, "qkv_bias", True)),
                       False, None, None, renormalize=bool(cfg.norm_topk_prob),
                       shared_expert_size=_qwen_shared(cfg), router_weights_dtype=True)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    @classmethod
    def spec(cls, cfg: Any) -> MoeSpec:
        bias = bool(getattr(cfg, "attention_bias", False))
        return MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj"), bias, bias, "head", None,
                       renormalize=bool(cfg.norm_topk_prob), shared_expert_size=0, router_weights_dtype=True)


class OlmoeForCausalLM(MoeForCausalLM):
    # its q/k RMSNorm spans every head of the projection: split heads would need a reduction
    supports_tensor_parallel = False

    @classmethod
    def spec(cls, cfg: Any) -> MoeSpec:
        bias = bool(getattr(cfg, "attention_bias", False))
        clip = getattr(cfg, "clip_qkv", None)
        return MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj"), bias, bias, "full",
                       float(clip) if clip is not None else None, renormalize=bool(cfg.norm_topk_prob),
                       shared_expert_size=0, router_weights_dtype=True)
