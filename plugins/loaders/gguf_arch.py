"""llama.cpp GGUF architectures kvyard maps itself: the HF config, and the MoE tensor names.

transformers' GGUF support misses what these files need (the experts' and shared expert's FFN
sizes of qwen2moe / qwen3moe, Qwen3's head_dim from ``attention.key_length``; olmoe and Mixtral
not at all), so for the architectures in ``ARCHS`` the loader builds the config from the file's
metadata here; any other architecture goes through transformers (AutoConfig with gguf_file=).

    GGUF general.architecture    HF architecture        experts' HF names (per layer N)
    qwen3                        Qwen3ForCausalLM       -
    qwen3moe                     Qwen3MoeForCausalLM    model.layers.N.mlp.experts.E.{gate,up,down}_proj
    qwen2moe                     Qwen2MoeForCausalLM    same, + mlp.shared_expert.*, mlp.shared_expert_gate
    olmoe                        OlmoeForCausalLM       same as qwen3moe
    llama with expert_count > 0  MixtralForCausalLM     model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}

Metadata keys are ``<arch>.<key>`` (llama.cpp's converter writes them; see its TextModel.
set_gguf_parameters). Routing: llama.cpp renormalises the top-k weights per architecture
(qwen3moe and Mixtral yes, qwen2moe and olmoe no); ``expert_weights_norm`` overrides that where
a file has it. Gating functions other than softmax and an ``expert_weights_scale`` other than 1
are refused by name (no such file of these architectures exists).

Stacked experts (llama.cpp keeps one tensor per projection and layer, ggml order reversed):

    blk.N.ffn_gate_exps / ffn_up_exps   ggml {H, I, E} = torch [E, I, H]
    blk.N.ffn_down_exps                 ggml {I, H, E} = torch [E, H, I]
    blk.N.ffn_gate_up_exps              torch [E, 2I, H], rows [gate | up] (--fuse-gate-up-exps)
    blk.N.ffn_{gate,up,down}.E          one expert per tensor (Mixtral files from before stacking)

``expert_roles`` says which (HF name, expert, role) a GGUF tensor name holds; the loader slices
the stacked tensor per expert (whole rows, so quantized blocks slice without re-encoding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

_GATE, _UP, _DOWN = "gate", "up", "down"


@dataclass(frozen=True)
class GGUFArch:
    hf_architecture: str
    model_type: str
    moe_block: Optional[str] = None          # HF name of a layer's MoE block; None: dense model
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")   # (gate, up, down)
    experts_field: str = "num_experts"       # the HF config field of the expert count
    renormalize: bool = False                # llama.cpp's top-k renormalisation for the arch
    extra: tuple[tuple[str, Any], ...] = ()  # fixed HF config fields (tuples become lists)

    def part(self, role: str) -> str:
        return self.expert_parts[(_GATE, _UP, _DOWN).index(role)]


_QWEN_MOE_FIELDS = (("mlp_only_layers", ()), ("decoder_sparse_step", 1), ("use_sliding_window", False))
ARCHS: dict[str, GGUFArch] = {
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", extra=(("use_sliding_window", False),)),
    "qwen3moe": GGUFArch("Qwen3MoeForCausalLM", "qwen3_moe", "mlp", renormalize=True, extra=_QWEN_MOE_FIELDS),
    "qwen2moe": GGUFArch("Qwen2MoeForCausalLM", "qwen2_moe", "mlp", extra=_QWEN_MOE_FIELDS),
    "olmoe": GGUFArch("OlmoeForCausalLM", "olmoe", "mlp", extra=(("clip_qkv", None),)),
}
MIXTRAL = GGUFArch("MixtralForCausalLM", "mixtral", "block_sparse_moe", ("w1", "w3", "w2"),
                   "num_local_experts", renormalize=True, extra=(("sliding_window", None),))
_SOFTMAX_GATING = 1   # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def arch_of(metadata: dict) -> Optional[GGUFArch]:
    """The mapping for this file, or None when transformers' GGUF support handles it."""
    arch = metadata.get("general.architecture")
    if arch == "llama" and int(metadata.get("llama.expert_count") or 0) > 0:
        return MIXTRAL
    return ARCHS.get(arch)


def hf_config_dict(metadata: dict, tensor_shapes: dict[str, tuple[int, ...]]) -> dict:
    """The HF config (as keyword arguments of its config class) of a file of a mapped
    architecture. ``tensor_shapes``: GGUF tensor name -> torch-order shape."""
    spec = arch_of(metadata)
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = KeyError) -> Any:
        value = metadata.get(f"{arch}.{key}")
        if value is None:
            if default is KeyError:
                raise ValueError(f"model_path: GGUF metadata lacks {arch}.{key}")
            return default
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    cfg: dict[str, Any] = dict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in spec.extra}, architectures=[spec.hf_architecture], model_type=spec.model_type,
        num_hidden_layers=int(get("block_count")), hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        vocab_size=int(tensor_shapes["token_embd.weight"][0]),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"))
    cfg.update(_attention_fields(get, hidden, heads, tensor_shapes, spec))
    cfg["rope_parameters"] = _rope_parameters(get, arch)
    if spec.moe_block is not None:
        cfg.update(_moe_fields(get, arch, spec, cfg["intermediate_size"]))
    return cfg


def _attention_fields(get, hidden: int, heads: int, tensor_shapes: dict, spec: GGUFArch) -> dict:
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError("model_path: GGUF files whose value heads differ from key heads are not supported yet")
    rotary = int(get("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"model_path: partial rotary embeddings (rope.dimension_count {rotary} < head "
                         f"dim {head_dim}) are not supported yet for GGUF files")
    bias = "blk.0.attn_q.bias" in tensor_shapes
    out: dict[str, Any] = {"head_dim": head_dim}
    if spec.model_type == "qwen2_moe":
        out["qkv_bias"] = bias
    elif spec.model_type != "mixtral":
        out["attention_bias"] = bias
    return out


def _rope_parameters(get, arch: str) -> dict:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return params
    if kind not in ("linear", "yarn"):
        raise ValueError(f"model_path: {arch}.rope.scaling.type {kind!r} is not supported yet for GGUF "
                         f"files (supported: none, linear, yarn)")
    params.update(rope_type=kind, factor=float(get("rope.scaling.factor")))
    if kind == "yarn":
        params["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    return params


def _moe_fields(get, arch: str, spec: GGUFArch, ffn: int) -> dict:
    experts, used = int(get("expert_count")), int(get("expert_used_count"))
    gating = int(get("expert_gating_func", _SOFTMAX_GATING))
    if gating != _SOFTMAX_GATING:
        raise ValueError(f"model_path: {arch}.expert_gating_func {gating} is not supported yet "
                         f"(these architectures route with softmax)")
    if float(get("expert_weights_scale", 1.0)) != 1.0:
        raise ValueError(f"model_path: {arch}.expert_weights_scale other than 1 is not supported yet")
    out: dict[str, Any] = {spec.experts_field: experts, "num_experts_per_tok": used}
    if spec.model_type == "mixtral":
        return out                  # intermediate_size is the experts' size; always renormalised
    out["norm_topk_prob"] = bool(get("expert_weights_norm", spec.renormalize))
    if spec.model_type in ("qwen3_moe", "qwen2_moe"):
        # llama.cpp's fallback when the key is missing: the dense size shared by the used experts
        out["moe_intermediate_size"] = int(get("expert_feed_forward_length", ffn // used))
    if spec.model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length", ffn))
    return out


def expert_roles(base: str) -> Optional[tuple[Optional[int], tuple[str, ...]]]:
    """A block tensor's base name ("ffn_gate_exps", "ffn_up.3", ...) -> (expert or None for
    every expert of a stacked tensor, the roles its rows hold in order); None if not an expert."""
    stacked = {"ffn_gate_exps": (_GATE,), "ffn_up_exps": (_UP,), "ffn_down_exps": (_DOWN,),
               "ffn_gate_up_exps": (_GATE, _UP)}
    if base in stacked:
        return None, stacked[base]
    name, _, expert = base.rpartition(".")
    if name in ("ffn_gate", "ffn_up", "ffn_down") and expert.isdigit():
        return int(expert), (name[4:],)
    return None


def moe_block_names(spec: GGUFArch) -> dict[str, str]:
    """GGUF block tensor base name -> HF name under model.layers.N (router and shared expert)."""
    block = spec.moe_block
    return {"ffn_gate_inp": f"{block}.gate",
            "ffn_gate_inp_shexp": f"{block}.shared_expert_gate",
            "ffn_gate_shexp": f"{block}.shared_expert.gate_proj",
            "ffn_up_shexp": f"{block}.shared_expert.up_proj",
            "ffn_down_shexp": f"{block}.shared_expert.down_proj"}
