"""The dummy load format: random weights from config.json alone, for benchmarks.

The loader never sees the model's parameters, so it generates the standard HF names of the
Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) and of the MoE families (dummy_moe_shapes.py:
Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3) from the config: projections ~ N(0, 0.02)
from a fixed seed (same config -> same weights), norms = 1, biases = 0.

Tokenizer: the folder's own when it has tokenizer files; otherwise the bundled default model's
(the SmolLM2 GGUF), so config-only folders such as benchmarks/configs/* still serve text. That
tokenizer's ids (< 49152) are valid for any model whose vocabulary is at least as large.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from kvyard.loader import TokenizerSource
from kvyard.model_source import default_model_path
from kvyard_plugins.loaders.dummy_moe_shapes import MOE_MODEL_TYPES, moe_family_shapes
from kvyard_plugins.loaders.hf_folder import HFFolderLoader

SEED = 0
INIT_STD = 0.02
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class DummyLoader(HFFolderLoader):
    name = "dummy"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return (Path(model_path) / "config.json").is_file()

    def tokenizer_source(self, model_path: str) -> TokenizerSource:
        if any((Path(model_path) / f).is_file() for f in _TOKENIZER_FILES):
            return super().tokenizer_source(model_path)
        try:
            default = Path(default_model_path())
        except ValueError:  # no bundled model here: only token-id workloads (benchmarks) can run
            return TokenizerSource(model_path, {})
        return TokenizerSource(str(default.parent), {"gguf_file": default.name})

    def weights(self, model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        generator = torch.Generator(device=self.config.device).manual_seed(SEED)
        moe = getattr(hf_config, "model_type", None) in MOE_MODEL_TYPES
        for name, shape in (moe_family_shapes if moe else llama_family_shapes)(hf_config):
            yield name, self._tensor(name, shape, generator)

    def _tensor(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        like = dict(dtype=self.config.dtype, device=self.config.device)
        if name.endswith("norm.weight"):
            return torch.ones(shape, **like)
        if name.endswith(".bias"):
            return torch.zeros(shape, **like)
        return torch.randn(shape, generator=generator, **like).mul_(INIT_STD)


def llama_family_shapes(cfg: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF parameter name, shape) of every parameter of a Llama-family causal LM."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"load_format: dummy supports model types "
                         f"{', '.join(SUPPORTED_MODEL_TYPES + MOE_MODEL_TYPES)}; "
                         f"the config has {model_type!r}")
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(cfg.num_hidden_layers):
        yield from _layer_shapes(cfg, f"model.layers.{layer}")
    yield "model.norm.weight", (hidden,)
    if not getattr(cfg, "tie_word_embeddings", False):
        yield "lm_head.weight", (vocab, hidden)


def _layer_shapes(cfg: Any, prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    qkv_bias, o_bias, mlp_bias = _bias_flags(cfg)
    attn = f"{prefix}.self_attn"
    for proj, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                       ("v_proj", kv_heads * head_dim)):
        yield f"{attn}.{proj}.weight", (rows, hidden)
        if qkv_bias:
            yield f"{attn}.{proj}.bias", (rows,)
    yield f"{attn}.o_proj.weight", (hidden, heads * head_dim)
    if o_bias:
        yield f"{attn}.o_proj.bias", (hidden,)
    if cfg.model_type == "qwen3":
        yield f"{attn}.q_norm.weight", (head_dim,)
        yield f"{attn}.k_norm.weight", (head_dim,)
    for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                        ("down_proj", (hidden, inter))):
        yield f"{prefix}.mlp.{proj}.weight", shape
        if mlp_bias:
            yield f"{prefix}.mlp.{proj}.bias", (shape[0],)
    yield f"{prefix}.input_layernorm.weight", (hidden,)
    yield f"{prefix}.post_attention_layernorm.weight", (hidden,)


def _bias_flags(cfg: Any) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, mlp bias) as each HF architecture defines them."""
    if cfg.model_type == "qwen2":
        return True, False, False
    if cfg.model_type == "mistral":
        return False, False, False
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    mlp_bias = cfg.model_type == "llama" and bool(getattr(cfg, "mlp_bias", False))
    return attention_bias, attention_bias, mlp_bias
