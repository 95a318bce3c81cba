"""HF parameter names and shapes of the mixture-of-experts families, for the dummy load format:
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (GQA attention + experts) and DeepSeek-V2/V3 (multi-head
latent attention + experts). Names follow the checkpoints on the hub (one tensor per expert)."""
from __future__ import annotations

from typing import Any, Iterator

Shapes = Iterator[tuple[str, tuple[int, ...]]]
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def moe_family_shapes(cfg: Any) -> Shapes:
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        if cfg.model_type.startswith("deepseek"):
            yield from _mla_shapes(cfg, f"{prefix}.self_attn")
            yield from _deepseek_mlp_shapes(cfg, layer, f"{prefix}.mlp")
        else:
            yield from _gqa_shapes(cfg, f"{prefix}.self_attn")
            yield from _moe_mlp_shapes(cfg, layer, prefix)
        yield f"{prefix}.input_layernorm.weight", (hidden,)
        yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    if not getattr(cfg, "tie_word_embeddings", False):
        yield "lm_head.weight", (vocab, hidden)


def _gqa_shapes(cfg: Any, prefix: str) -> Shapes:
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    bias = getattr(cfg, "qkv_bias", False) if cfg.model_type == "qwen2_moe" else getattr(cfg, "attention_bias", False)
    for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)):
        yield f"{prefix}.{proj}.weight", (rows, hidden)
        if bias:
            yield f"{prefix}.{proj}.bias", (rows,)
    yield f"{prefix}.o_proj.weight", (hidden, heads * head_dim)
    if bias and cfg.model_type != "qwen2_moe":
        yield f"{prefix}.o_proj.bias", (hidden,)
    if cfg.model_type == "qwen3_moe":
        yield f"{prefix}.q_norm.weight", (head_dim,)
        yield f"{prefix}.k_norm.weight", (head_dim,)
    elif cfg.model_type == "olmoe":
        yield f"{prefix}.q_norm.weight", (heads * head_dim,)
        yield f"{prefix}.k_norm.weight", (kv_heads * head_dim,)


def _mlp(prefix: str, hidden: int, inter: int, parts=("gate_proj", "up_proj", "down_proj")) -> Shapes:
    yield f"{prefix}.{parts[0]}.weight", (inter, hidden)
    yield f"{prefix}.{parts[1]}.weight", (inter, hidden)
    yield f"{prefix}.{parts[2]}.weight", (hidden, inter)


def _moe_mlp_shapes(cfg: Any, layer: int, prefix: str) -> Shapes:
    hidden = cfg.hidden_size
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    sparse = layer not in (getattr(cfg, "mlp_only_layers", None) or []) and \
        (layer + 1) % (getattr(cfg, "decoder_sparse_step", 1) or 1) == 0
    if cfg.model_type == "mixtral":
        yield f"{prefix}.block_sparse_moe.gate.weight", (experts, hidden)
        for e in range(experts):
            yield from _mlp(f"{prefix}.block_sparse_moe.experts.{e}", hidden, cfg.intermediate_size, ("w1", "w3", "w2"))
        return
    if not sparse:
        yield from _mlp(f"{prefix}.mlp", hidden, cfg.intermediate_size)
        return
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    yield f"{prefix}.mlp.gate.weight", (experts, hidden)
    for e in range(experts):
        yield from _mlp(f"{prefix}.mlp.experts.{e}", hidden, inter)
    if cfg.model_type == "qwen2_moe":
        yield from _mlp(f"{prefix}.mlp.shared_expert", hidden, cfg.shared_expert_intermediate_size)
        yield f"{prefix}.mlp.shared_expert_gate.weight", (1, hidden)


def _mla_shapes(cfg: Any, prefix: str) -> Shapes:
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if getattr(cfg, "q_lora_rank", None):
        yield f"{prefix}.q_a_proj.weight", (cfg.q_lora_rank, hidden)
        yield f"{prefix}.q_a_layernorm.weight", (cfg.q_lora_rank,)
        yield f"{prefix}.q_b_proj.weight", (heads * qk, cfg.q_lora_rank)
    else:
        yield f"{prefix}.q_proj.weight", (heads * qk, hidden)
    yield f"{prefix}.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, hidden)
    yield f"{prefix}.kv_a_layernorm.weight", (cfg.kv_lora_rank,)
    yield f"{prefix}.kv_b_proj.weight", (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    yield f"{prefix}.o_proj.weight", (hidden, heads * cfg.v_head_dim)


def _deepseek_mlp_shapes(cfg: Any, layer: int, prefix: str) -> Shapes:
    hidden = cfg.hidden_size
    if layer < (cfg.first_k_dense_replace or 0):
        yield from _mlp(prefix, hidden, cfg.intermediate_size)
        return
    experts = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.num_experts
    yield f"{prefix}.gate.weight", (experts, hidden)
    if cfg.model_type == "deepseek_v3":
        yield f"{prefix}.gate.e_score_correction_bias", (experts,)
    for e in range(experts):
        yield from _mlp(f"{prefix}.experts.{e}", hidden, cfg.moe_intermediate_size)
    if getattr(cfg, "n_shared_experts", None):
        yield from _mlp(f"{prefix}.shared_experts", hidden, cfg.moe_intermediate_size * cfg.n_shared_experts)
