"""Tiny GGUF files of the architectures the gguf loader maps (Qwen3, Qwen3-MoE, Qwen2-MoE, OLMoE,
Mixtral), written with gguf.GGUFWriter in llama.cpp's layout from tiny random transformers models.

The layout follows llama.cpp's convert_hf_to_gguf.py (checked against it by hand on these tiny
models: same tensor names, ggml shapes, types and metadata keys):
  metadata   <arch>.block_count, context_length, embedding_length, feed_forward_length,
             attention.head_count(_kv), rope.freq_base, attention.layer_norm_rms_epsilon,
             expert_count, expert_used_count, expert_feed_forward_length (Qwen MoE),
             expert_shared_feed_forward_length (Qwen2-MoE), attention.key/value_length (when the
             config names head_dim), llama: vocab_size + rope.dimension_count; OLMoE: rms eps 1e-5
  tensors    token_embd, output (absent when tied), output_norm; blk.N.attn_{q,k,v,output},
             attn_{q,k}_norm, attn_norm, ffn_norm, ffn_gate_inp (router), stacked
             ffn_{gate,up,down}_exps [E, rows, cols], ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp
             [1, H]; llama's q/k rows permuted for its interleaved rope
  types      1-D tensors, *_norm and the routers stay F32; every other weight in ``qtype``, or
             F16 where its rows are not whole blocks (Qwen2-MoE's shared down_proj here)
  tokenizer  the tiny byte-level BPE of tests/unit/tiny_tokenizer.py as a "gpt2" vocabulary,
             padded to the model's vocab size with [PAD<i>] tokens (as the converter does), with
             the merges that spell its two-character pieces
"""
from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import torch
import transformers

from moe_models import COMMON
from moe_models import SPECS as MOE_SPECS

Q = gguf.GGMLQuantizationType

SPECS: dict[str, tuple[str, dict]] = {
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32)),
    "qwen3-moe": MOE_SPECS["qwen3-moe"],
    # llama.cpp's qwen2moe has every layer sparse (its converter refuses dense mlp_only_layers)
    "qwen2-moe": (MOE_SPECS["qwen2-moe"][0], {**MOE_SPECS["qwen2-moe"][1], "mlp_only_layers": []}),
    # GGUF has no clip_qkv (llama.cpp's olmoe does not clamp)
    "olmoe": (MOE_SPECS["olmoe"][0], {**MOE_SPECS["olmoe"][1], "clip_qkv": None}),
    "mixtral": MOE_SPECS["mixtral"],
}
GGUF_ARCH = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe", "Qwen2MoeForCausalLM": "qwen2moe",
             "OlmoeForCausalLM": "olmoe", "MixtralForCausalLM": "llama"}
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
          "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_FLOAT_ONLY = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


# transformers' own GGUF loading (gguf_file=) misses head_dim for qwen3 and the experts' size for
# qwen3moe, taking its config defaults; these shapes equal those defaults, so it reads them right.
TRANSFORMERS_READABLE = {"qwen3": dict(head_dim=128), "qwen3-moe": dict(moe_intermediate_size=768)}


def build_hf(name: str, **overrides):
    arch, extra = SPECS[name]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    return getattr(transformers, arch)(config).eval()


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF name -> torch-order float32 tensor, in llama.cpp's layout."""
    cfg, out = model.config, {}
    llama = GGUF_ARCH[type(model).__name__] == "llama"
    for name, value in model.state_dict().items():
        value = value.detach().float()
        if name in _TOP:
            if not (name == "lm_head.weight" and cfg.tie_word_embeddings):
                out[_TOP[name]] = value
            continue
        _, _, layer, rest = name.split(".", 3)
        module, _, kind = rest.rpartition(".")
        prefix = f"blk.{layer}"
        if module == "mlp.experts":                     # transformers keeps them stacked in memory
            if kind == "gate_up_proj":
                gate, up = value.chunk(2, dim=1)
                out[f"{prefix}.ffn_gate_exps.weight"], out[f"{prefix}.ffn_up_exps.weight"] = gate, up
            else:
                out[f"{prefix}.ffn_down_exps.weight"] = value
            continue
        if llama and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
            value = _interleave_rope_rows(value, heads)
        out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
    return out


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split rotary rows -> llama.cpp's interleaved ones (its LlamaModel.permute)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def relayout_experts(tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The stacked experts as llama.cpp's other layouts: "fused" (--fuse-gate-up-exps:
    ffn_gate_up_exps [E, 2I, H]) or "per_expert" (old Mixtral files: ffn_gate.E [I, H], ...)."""
    out = {}
    for name, value in tensors.items():
        prefix, _, rest = name.rpartition(".ffn_")
        if layout == "fused" and rest == "up_exps.weight":
            continue
        if layout == "fused" and rest == "gate_exps.weight":
            out[f"{prefix}.ffn_gate_up_exps.weight"] = torch.cat([value, tensors[f"{prefix}.ffn_up_exps.weight"]], 1)
        elif layout == "per_expert" and rest.endswith("_exps.weight"):
            for e, expert in enumerate(value):
                out[f"{prefix}.ffn_{rest.split('_')[0]}.{e}.weight"] = expert
        else:
            out[name] = value
    return out


def write_gguf(model, path: str, qtype: Q = Q.F32, layout: str = "stacked") -> str:
    cfg = model.config
    arch = GGUF_ARCH[type(model).__name__]
    writer = gguf.GGUFWriter(path, arch)
    _metadata(writer, cfg, arch, qtype)
    _tokenizer(writer, cfg.vocab_size)
    tensors = gguf_tensors(model)
    for name, value in (tensors if layout == "stacked" else relayout_experts(tensors, layout)).items():
        kind = Q.F32 if value.dim() == 1 or name.endswith(_FLOAT_ONLY) else qtype
        try:
            data = gguf.quants.quantize(value.numpy(), kind)
        except gguf.QuantError:          # rows not a multiple of the block: F16, as the converter
            kind = Q.F16
            data = gguf.quants.quantize(value.numpy(), kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _metadata(writer, cfg, arch: str, qtype: Q) -> None:
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5 if arch == "olmoe" else cfg.rms_norm_eps)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and arch != "llama":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type({Q.F32: 0, Q.Q8_0: 7, Q.Q4_0: 2, Q.Q4_1: 3}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch in ("qwen3moe", "qwen2moe"):
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "llama":
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim or cfg.hidden_size // cfg.num_attention_heads)


def _tokenizer(writer, vocab_size: int) -> None:
    spec = importlib.util.spec_from_file_location(
        "tiny_tokenizer", os.path.join(os.path.dirname(__file__), "unit", "tiny_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tok = module.build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i < 2 else gguf.TokenType.NORMAL if i in by_id
             else gguf.TokenType.UNUSED for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # the in-memory tokenizer has no merges; every multi-character piece is two characters
    writer.add_token_merges([f"{t[0]} {t[1]}" for t in tokens[2:len(by_id)] if len(t) == 2])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)


def save_tiny_gguf(name: str, root: str, qtype: Q = Q.F32, **overrides):
    """(GGUF path, HF model) of the tiny ``name`` model (config ``overrides``) written under ``root``."""
    model = build_hf(name, **overrides)
    folder = os.path.join(root, f"{name}-{qtype.name}{'-' if overrides else ''}{'-'.join(map(str, overrides.values()))}")
    os.makedirs(folder, exist_ok=True)
    return write_gguf(model, os.path.join(folder, f"{name}.{qtype.name}.gguf"), qtype), model


def dequantized_copy(model, path: str):
    """``model`` with every weight replaced by what the GGUF at ``path`` holds, dequantized:
    the transformers reference of a quantized file."""
    reader = gguf.GGUFReader(path)
    stored = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
              for t in reader.tensors}
    ref = type(model)(model.config)
    state = ref.state_dict()
    for name, value in gguf_tensors(model).items():
        _assign(state, model.config, GGUF_ARCH[type(model).__name__], name, stored[name].reshape(value.shape))
    ref.load_state_dict(state)
    return ref.eval()


def _assign(state: dict, cfg, arch: str, gguf_name: str, value: torch.Tensor) -> None:
    top = {v: k for k, v in _TOP.items()}
    if gguf_name in top:
        state[top[gguf_name]] = value
        if gguf_name == "token_embd.weight" and cfg.tie_word_embeddings:
            state["lm_head.weight"] = value
        return
    _, layer, base, kind = gguf_name.split(".")
    prefix = f"model.layers.{layer}"
    if base in ("ffn_gate_exps", "ffn_up_exps"):
        stacked = state[f"{prefix}.mlp.experts.gate_up_proj"]
        half = stacked.shape[1] // 2
        rows = slice(0, half) if base == "ffn_gate_exps" else slice(half, None)
        stacked[:, rows] = value
        return
    if base == "ffn_down_exps":
        state[f"{prefix}.mlp.experts.down_proj"] = value
        return
    module = {v: k for k, v in _BLOCK.items()}[base]
    if arch == "llama" and base in ("attn_q", "attn_k"):
        heads = cfg.num_attention_heads if base == "attn_q" else cfg.num_key_value_heads
        value = _deinterleave_rope_rows(value, heads)
    state[f"{prefix}.{module}.{kind}"] = value


def _deinterleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
