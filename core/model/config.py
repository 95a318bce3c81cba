"""ModelConfig: what the engine needs to know about a model, read once from its checkpoint.

``ModelConfig.from_path`` resolves the model path (default model, hub cache), the load format
(``--load-format auto`` is decided in kvyard.model.source), asks that format's loader for the HF
config, applies ``--json-model-override-args`` and derives the shapes, context length and EOS
ids. ``resolve_dtype`` turns ``--dtype`` into a torch dtype, logging why for "auto".
"""
from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from kvyard.loader import LoadConfig, TokenizerSource
from kvyard.model.source import default_model_path, local_model_path, resolve_load_format
from kvyard.plugins import registry

logger = logging.getLogger(__name__)

# Config keys that bound the positions a model was trained for; the smallest present wins.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "max_sequence_length", "model_max_length")
_FALLBACK_CONTEXT_LENGTH = 2048
# An architecture with one of these suffixes generates text; anything else (BertModel,
# *ForSequenceClassification, *EmbeddingModel, ...) is served as an embedding model.
_GENERATION_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    model_path: str                 # local file or folder (hub ids resolved to the cache)
    load_format: str                # resolved, never "auto"
    hf_config: Any                  # transformers PretrainedConfig, overrides applied
    architectures: list[str]
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    is_generation: bool
    eos_token_ids: list[int]
    config_dtype: Optional[torch.dtype]   # the checkpoint's own dtype, if the config names one
    tokenizer_source: TokenizerSource

    @classmethod
    def from_path(cls, model_path: Optional[str], load_config: LoadConfig,
                  context_length: Optional[int] = None, json_model_override_args: str = "",
                  is_embedding: Optional[bool] = None) -> "ModelConfig":
        path = local_model_path(model_path or default_model_path(), load_config.revision)
        load_format = resolve_load_format(path, load_config.load_format)
        loader = registry("load_formats").get(load_format)(replace(load_config, load_format=load_format))
        hf_config = loader.hf_config(path)
        apply_overrides(hf_config, parse_overrides(
            json_model_override_args or load_config.json_model_override_args))
        architectures = architectures_of(hf_config)
        hf_config.architectures = architectures
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        num_heads = text.num_attention_heads
        tokenizer = loader.tokenizer_source(path)
        return cls(
            model_path=path, load_format=load_format, hf_config=hf_config,
            architectures=architectures, num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size, num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
            vocab_size=text.vocab_size,
            context_length=choose_context_length(derived_context_length(text), context_length),
            is_generation=not is_embedding and is_generation_architecture(architectures),
            eos_token_ids=eos_token_ids(path, hf_config, tokenizer),
            config_dtype=config_dtype(hf_config), tokenizer_source=tokenizer)


def parse_overrides(text: str) -> dict:
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_model_override_args: not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ValueError("json_model_override_args: must be a JSON object, "
                         f"got {type(overrides).__name__}")
    return overrides


def apply_overrides(hf_config: Any, overrides: dict) -> None:
    """Sets each key on the config; a dict value merges into an existing dict attribute
    (so {"rope_scaling": {"factor": 4}} keeps the other rope_scaling keys)."""
    for key, value in overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and isinstance(current, dict):
            value = {**current, **value}
        setattr(hf_config, key, value)
    if overrides:
        logger.info("model config overrides applied: %s", overrides)


def architectures_of(hf_config: Any) -> list[str]:
    """The config's architectures; GGUF configs name none, so derive the causal-LM class."""
    if getattr(hf_config, "architectures", None):
        return list(hf_config.architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(hf_config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    raise ValueError(f"model_path: the config names no architectures and model_type "
                     f"{model_type!r} has no known causal-LM class")


def is_generation_architecture(architectures: list[str]) -> bool:
    return any(arch.endswith(_GENERATION_SUFFIXES) for arch in architectures)


def derived_context_length(text_config: Any) -> int:
    lengths = [getattr(text_config, key) for key in _CONTEXT_KEYS
               if isinstance(getattr(text_config, key, None), int)]
    return min(lengths) if lengths else _FALLBACK_CONTEXT_LENGTH


def choose_context_length(derived: int, requested: Optional[int]) -> int:
    """--context-length wins; above what the model was trained for it is allowed with a warning
    (outputs past that point are unreliable), as SGLang does."""
    if requested is None:
        return derived
    if requested <= 0:
        raise ValueError(f"context_length: must be positive, got {requested}")
    if requested > derived:
        logger.warning("context_length %d is longer than the model's %d; outputs past %d tokens "
                       "may be garbage", requested, derived, derived)
    return requested


def eos_token_ids(model_path: str, hf_config: Any, tokenizer: TokenizerSource) -> list[int]:
    """generation_config.json's eos ids, then the config's; the tokenizer's only if neither has any."""
    folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    ids: list[int] = []
    generation = folder / "generation_config.json"
    if generation.is_file():
        ids += _as_list(json.loads(generation.read_text()).get("eos_token_id"))
    ids += _as_list(getattr(hf_config, "eos_token_id", None))
    if not ids:
        from transformers import AutoTokenizer

        ids = _as_list(AutoTokenizer.from_pretrained(tokenizer.path, **tokenizer.kwargs).eos_token_id)
    return list(dict.fromkeys(ids))


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def config_dtype(hf_config: Any) -> Optional[torch.dtype]:
    # transformers 5 calls it `dtype` (reading `torch_dtype` there logs a deprecation warning).
    value = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def resolve_dtype(requested: str, device: str,
                  config_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """--dtype as a torch dtype. "auto": on an accelerator the checkpoint's bf16/fp16 (float32
    checkpoints and unknown ones run in bfloat16); on the CPU bfloat16 only where the CPU has
    native bf16 math (AVX512-BF16 / AMX / Arm BF16), else float32."""
    if requested in _DTYPES:
        return _DTYPES[requested]
    if requested != "auto":
        raise ValueError(f"dtype: unknown {requested!r}; valid: auto, {', '.join(_DTYPES)}")
    if device == "cpu":
        native = cpu_has_native_bf16()
        chosen = torch.bfloat16 if native else torch.float32
        why = "the CPU has native bf16" if native else "the CPU has no native bf16 (AVX512-BF16/AMX)"
    elif config_dtype in (torch.bfloat16, torch.float16):
        chosen, why = config_dtype, "the checkpoint's dtype"
    else:
        chosen, why = torch.bfloat16, f"the checkpoint's dtype is {config_dtype or 'unknown'}"
    logger.info("dtype: %s (auto on %s: %s)", str(chosen).removeprefix("torch."), device, why)
    return chosen


def cpu_has_native_bf16() -> bool:
    """torch's own CPU probe where this torch has it (x86), else the kernel's CPU flags."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None and probe() for probe in probes):
        return True
    flags = _cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay on the safe float32 path
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()
