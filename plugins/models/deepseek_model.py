"""DeepSeek-V2 / V3: multi-head latent attention (MLA) and grouped top-k MoE with shared experts.

KV layout: "mla" (kvyard.kv_layout). Per token and layer the pool stores one row
[kv_lora_rank latent | qk_rope_head_dim rotated key], never per-head K and V.

Attention with weight absorption (T tokens, H heads, L = kv_lora_rank, R = qk_rope_head_dim,
N = qk_nope_head_dim, Dv = v_head_dim; kv_b_proj split per head into W_UK [H, N, L] and
W_UV [H, Dv, L]):

    q = q_b(rms(q_a(x))) or q_proj(x)            [T, H, N + R]  -> q_nope, q_rope
    c, k_rope = kv_a(x)                          [T, L], [T, R];  c = rms(c)
    q_rope, k_rope = rope(q_rope), rope(k_rope)
    q_lat = q_nope @ W_UK                        [T, H, L]   (q_nope . k_nope == q_lat . c)
    o_lat = attention(q=[q_lat | q_rope], kv row=[c | k_rope]) over the pool, V = c
                                                 [T, H, L]   (one shared kv "head": MQA)
    o = o_lat @ W_UV^T                           [T, H, Dv] -> o_proj
The same absorbed form runs for prefill and decode, so both read only the latent cache.
Softmax scale: (N + R) ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN (as
transformers' yarn_apply_mscale).

Rope: DeepSeek checkpoints rotate interleaved pairs (V2 always; V3 when rope_interleave). The
rope columns of q and k are de-interleaved ([evens | odds]) before the usual rotate-half rope:
the same dot products, since q and k get the same permutation.

MoE (kvyard.layers.moe): V2 softmax scores, top-k greedy or "group_limited_greedy" (groups
ranked by their best expert); V3 sigmoid scores + e_score_correction_bias, groups ranked by the
sum of their top two, weights renormalised per norm_topk_prob; both times routed_scaling_factor,
the router in float32 (as transformers), plus ungated shared experts. Layers below
first_k_dense_replace have a dense MLP.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.kv_layout import KVLayout
from kvyard.layers.attention import Attention
from kvyard.layers.decoder import DecoderLM, PreNormDecoderLayer
from kvyard.layers.linear import Linear
from kvyard.layers.mlp import GatedMLP
from kvyard.layers.moe import FusedMoE, Router, RoutingConfig, SparseMoeBlock
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RotaryEmbedding
from kvyard.layers.weights import as_dense, copy_checked
from kvyard.model_base import ModelBuildContext

Targets = dict[str, Callable[[Any], None]]


def softmax_scale(cfg: Any) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    all_dim = params.get("mscale_all_dim") or 0
    factor = float(params.get("factor") or 1.0)
    if rope_type != "default" and all_dim and factor > 1:
        m = 0.1 * all_dim * math.log(factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    def __init__(self, cfg: Any, layer_id: int, ctx: ModelBuildContext, prefix: str, interleaved: bool):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.lora = cfg.kv_lora_rank
        self.q_lora = getattr(cfg, "q_lora_rank", None)
        self.interleaved = interleaved
        lin = dict(dtype=ctx.dtype, device=ctx.device)
        bias = bool(getattr(cfg, "attention_bias", False))
        q_out = self.heads * (self.nope + self.rope)

        def linear(name: str, n_in: int, n_out, has_bias: bool = False) -> Linear:
            return Linear(n_in, n_out, bias=has_bias, method=ctx.linear_method(f"{prefix}.{name}"),
                          prefix=f"{prefix}.{name}", **lin)

        if self.q_lora:
            self.q_a_proj = linear("q_a_proj", cfg.hidden_size, self.q_lora, bias)
            self.q_a_layernorm = RMSNorm(self.q_lora, cfg.rms_norm_eps, ctx.dtype, ctx.device)
            self.q_b_proj = linear("q_b_proj", self.q_lora, q_out)
        else:
            self.q_proj = linear("q_proj", cfg.hidden_size, q_out)
        self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", cfg.hidden_size, self.lora + self.rope, bias)
        self.kv_a_layernorm = RMSNorm(self.lora, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        # kv_b stays dense: it is only used split and absorbed (process_after_loading)
        self.kv_b_weight = nn.Parameter(torch.empty(self.heads * (self.nope + self.v_dim), self.lora, **lin),
                                        requires_grad=False)
        self.o_proj = linear("o_proj", self.heads * self.v_dim, cfg.hidden_size, bias)
        self.attn = Attention(layer_id, self.heads, 1, self.lora + self.rope, scaling=softmax_scale(cfg),
                              v_head_dim=self.lora)
        # the absorbed halves of kv_b, filled after loading; buffers, so .to(device) moves them
        self.register_buffer("w_uk", torch.empty(self.heads, self.nope, self.lora, **lin), persistent=False)
        self.register_buffer("w_uv", torch.empty(self.heads, self.v_dim, self.lora, **lin), persistent=False)

    def process_after_loading(self) -> None:
        w = self.kv_b_weight.view(self.heads, self.nope + self.v_dim, self.lora)
        self.w_uk.copy_(w[:, :self.nope])                      # [H, N, L]
        self.w_uv.copy_(w[:, self.nope:])                      # [H, Dv, L]

    def _rope(self, x: torch.Tensor, cos_sin) -> torch.Tensor:
        """x [T, heads, R] -> rotated (de-interleaved first where the checkpoint interleaves)."""
        if self.interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return RotaryEmbedding.apply(x, cos_sin)

    def forward(self, x: torch.Tensor, cos_sin, fb: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(t, self.heads, self.nope + self.rope)
        q_nope, q_rope = q.split((self.nope, self.rope), dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split((self.lora, self.rope), dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_rope = self._rope(q_rope, cos_sin)
        k_rope = self._rope(k_rope.reshape(t, 1, self.rope), cos_sin)
        q_lat = torch.einsum("thn,hnl->thl", q_nope, self.w_uk)                 # [T, H, L]
        q_full = torch.cat((q_lat, q_rope), dim=-1)                              # [T, H, L + R]
        kv_row = torch.cat((latent, k_rope.view(t, self.rope)), dim=-1)         # [T, L + R]
        o_lat = self.attn(q_full.reshape(t, -1), kv_row, None, fb).view(t, self.heads, self.lora)
        o = torch.einsum("thl,hvl->thv", o_lat, self.w_uv)                      # [T, H, Dv]
        return self.o_proj(o.reshape(t, self.heads * self.v_dim))

    def targets(self, prefix: str) -> Targets:
        out: Targets = {}
        names = (["q_a_proj", "q_b_proj"] if self.q_lora else ["q_proj"]) + ["kv_a_proj_with_mqa", "o_proj"]
        for name in names:
            layer = getattr(self, name)
            out[f"{prefix}.{name}.weight"] = partial(layer.load_shard, 0)
            if layer.bias is not None:
                out[f"{prefix}.{name}.bias"] = partial(layer.load_bias_shard, 0)
        norms = [("kv_a_layernorm", self.kv_a_layernorm)] + ([("q_a_layernorm", self.q_a_layernorm)]
                                                             if self.q_lora else [])
        for name, norm in norms:
            out[f"{prefix}.{name}.weight"] = partial(copy_checked, norm.weight, name=f"{prefix}.{name}.weight")
        out[f"{prefix}.kv_b_proj.weight"] = partial(self._load_kv_b, f"{prefix}.kv_b_proj.weight")
        return out

    def _load_kv_b(self, name: str, weight: Any) -> None:
        copy_checked(self.kv_b_weight, as_dense(weight, name), name)


def routing_config(cfg: Any, v3: bool) -> RoutingConfig:
    experts = (getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_local_experts", None)
               or cfg.num_experts)
    common = dict(num_experts=experts, top_k=cfg.num_experts_per_tok,
                  scaling=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0))
    if v3:
        return RoutingConfig(**common, scoring="sigmoid", renormalize=bool(cfg.norm_topk_prob),
                             renormalize_eps=1e-20, num_groups=cfg.n_group or 1,
                             topk_groups=cfg.topk_group or 1, group_score="top2_sum")
    grouped = getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"
    return RoutingConfig(**common, scoring="softmax", num_groups=cfg.n_group if grouped else 1,
                         topk_groups=cfg.topk_group if grouped else 1, group_score="max")


def build_moe(cfg: Any, ctx: ModelBuildContext, prefix: str, v3: bool) -> SparseMoeBlock:
    routing = routing_config(cfg, v3)
    router = Router(cfg.hidden_size, routing.num_experts, torch.float32, ctx.device, correction_bias=v3)
    experts = FusedMoE(routing.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, ctx, f"{prefix}.experts")
    shared = None
    if getattr(cfg, "n_shared_experts", None):
        shared = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx,
                          f"{prefix}.shared_experts")
    return SparseMoeBlock(routing, router, experts, shared, shared_name="shared_experts")


class DeepseekDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: Any, layer_id: int, ctx: ModelBuildContext, v3: bool, interleaved: bool):
        super().__init__()
        prefix = f"model.layers.{layer_id}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.self_attn = MLAttention(cfg, layer_id, ctx, f"{prefix}.self_attn", interleaved)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.dtype, ctx.device)
        self.mlp = (build_moe(cfg, ctx, f"{prefix}.mlp", v3) if layer_id >= (cfg.first_k_dense_replace or 0)
                    else GatedMLP(cfg.hidden_size, cfg.intermediate_size, ctx, f"{prefix}.mlp"))


class DeepseekV2ForCausalLM(DecoderLM):
    """Model plugin contract: see kvyard.model_base (declares the "mla" KV layout)."""

    V3 = False

    def __init__(self, hf_config: Any, ctx: ModelBuildContext):
        cfg = hf_config
        super().__init__(cfg, ctx, cfg.qk_rope_head_dim)
        interleaved = bool(getattr(cfg, "rope_interleave", True)) if self.V3 else True
        self.layers.extend(DeepseekDecoderLayer(cfg, i, ctx, self.V3, interleaved)
                           for i in range(cfg.num_hidden_layers))

    def kv_layout(self) -> KVLayout:
        cfg = self.config
        return KVLayout.mla(cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim)

    def layer_targets(self, prefix: str, layer: DeepseekDecoderLayer) -> Targets:
        targets = layer.self_attn.targets(f"{prefix}.self_attn")
        targets.update(layer.mlp.targets(f"{prefix}.mlp"))
        targets.update(layer.norm_targets(prefix))
        return targets


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    V3 = True
