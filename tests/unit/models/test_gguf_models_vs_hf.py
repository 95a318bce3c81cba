"""Qwen3, Qwen3-MoE, Qwen2-MoE, OLMoE and Mixtral from GGUF files, against transformers (CPU).

Tiny random transformers models written as GGUF in llama.cpp's layout (tests/gguf_models.py:
stacked ffn_*_exps experts, routers, shared experts, q/k norms, Mixtral as "llama" with experts
and permuted q/k rows), loaded through the gguf load-format plugin (config from the metadata) and
run on torch_native attention; 4 prompts x 16 greedy tokens decoded as one batch with 16-token
chunked prefill:

  F32 file, dequantized load         tokens equal to transformers on the original weights, step
                                     logits within 1e-4
  quantized file (Q8_0 / Q4_0 /      tokens equal to transformers holding the file's dequantized
  Q4_1), dequantized load            weights (the --dtype float32 path), logits within 1e-4
  quantized file, kept quantized     every expert keeps its blocks and multiplies through the GGUF
  (--quantization gguf)              method; tokens equal to the same reference; prefill logits
                                     within KEPT_REL_ERR (the int kernel quantizes activations)
  transformers' own gguf_file= load  where it reads the file right (Qwen3 with its default head
                                     dim, Qwen3-MoE with its default expert size): our greedy
                                     tokens equal its

The default run keeps one case per check (Mixtral's permuted q/k and Qwen2-MoE's shared expert
from F32 files, a Q4_1 Qwen3-MoE dequantized, a Q4_0 Qwen2-MoE kept quantized, Q8_0 Qwen3-MoE
against transformers' own load); the rest are marked slow.
"""
from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

import kvyard_plugins.attention.torch_native as torch_native_plugin
import kvyard_plugins.loaders as loaders_plugin
import kvyard_plugins.models.llama as llama_plugin
import kvyard_plugins.models.moe as moe_plugin
from forward_harness import Harness, PagedKV
from gguf_models import SPECS, TRANSFORMERS_READABLE, Q, dequantized_copy, save_tiny_gguf
from hf_reference import assert_matches_reference, hf_reference, max_relative_error, plugin_manager
from kvyard.layers.linear import Linear
from kvyard.loader import LoadConfig
from kvyard.model_base import ModelBuildContext
from kvyard.quantization import QuantizationConfig
from kvyard_plugins.loaders import gguf_loader
from kvyard_plugins.quantization import gguf_kernels

STEPS = 16
ATOL = 1e-4
KEPT_REL_ERR = 5e-4   # measured <= 3.5e-5 (Qwen2-MoE Q4_0); experts under 16 rows take the int kernel
_g = torch.Generator().manual_seed(2468)
PROMPTS = [torch.randint(3, 256, (n,), generator=_g).tolist() for n in (37, 29, 5, 23)]
# one quantized type per architecture keeps the default run short; every type the kernels take
QUANTIZED = {"qwen3": Q.Q8_0, "qwen3-moe": Q.Q4_1, "qwen2-moe": Q.Q4_0, "olmoe": Q.Q8_0, "mixtral": Q.Q4_0}
PM = plugin_manager(moe_plugin, llama_plugin, loaders_plugin, torch_native_plugin)


@pytest.fixture(scope="module", autouse=True)
def converted_in_tmp(tmp_path_factory):
    """The loader's converted config / tokenizer folders and tensor indexes of these throwaway
    files go to a temporary folder (KVYARD_CACHE_DIR would also move the compiled kernels)."""
    base, original = tmp_path_factory.mktemp("gguf-cache"), gguf_loader._cache_folder
    patch = pytest.MonkeyPatch()
    patch.setattr(gguf_loader, "_cache_folder", lambda path, version="": base / original(path, version).name)
    yield
    patch.undo()


def default_run(names, keep: tuple[str, ...]) -> list:
    """``names`` as parameters, all but ``keep`` marked slow (the default run stays short)."""
    return [pytest.param(n, marks=() if n in keep else pytest.mark.slow) for n in sorted(names)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("gguf"))


@lru_cache(maxsize=None)
def tiny_file(name: str, qtype: Q, root: str, **overrides):
    """(GGUF path, transformers model holding what the file holds)."""
    path, hf = save_tiny_gguf(name, root, qtype, **overrides)
    return path, (hf if qtype == Q.F32 else dequantized_copy(hf, path))


@lru_cache(maxsize=None)
def reference(name: str, qtype: Q, root: str, **overrides):
    """tiny_file's (path, model) and the model's greedy outputs."""
    path, ref = tiny_file(name, qtype, root, **overrides)
    return path, ref, hf_reference(ref, PROMPTS, STEPS)


def load(path: str, keep_quantized: bool = False):
    """Our model of the GGUF at ``path``, the way the model runner loads it."""
    loader = PM.registry("load_formats").get("gguf")(LoadConfig(load_format="gguf", keep_quantized=keep_quantized))
    cfg = loader.hf_config(path)
    quant = None
    if keep_quantized:
        from kvyard_plugins.quantization.gguf_method import GGUFQuantization
        quant = GGUFQuantization(QuantizationConfig("gguf", torch.float32, "cpu"))
    model = PM.registry("model_architectures").get(cfg.architectures[0])(
        cfg, ModelBuildContext(torch.float32, "cpu", quant))
    model.load_weights(loader.weights(path, cfg))
    return model.eval(), cfg


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def harness(model, cfg) -> Harness:
    head_dim = head_dim_of(cfg)
    kv = PagedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, num_pages=512)
    backend = PM.registry("attention_backends").get("torch_native")(kv.backend_config(cfg.num_attention_heads, head_dim))
    return Harness(model, backend, kv)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_config_from_the_metadata_equals_the_models(name, root):
    path, hf = tiny_file(name, Q.F32, root)
    cfg = load(path)[1]
    want = hf.config
    assert cfg.architectures == [type(hf).__name__]
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "rms_norm_eps", "tie_word_embeddings", "num_experts_per_tok", "num_local_experts",
              "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
              "attention_bias", "qkv_bias"]
    for field in fields:
        if getattr(want, field, None) is not None or getattr(cfg, field, None) is not None:
            got, expected = getattr(cfg, field), getattr(want, field)
            assert got == pytest.approx(expected), field
    assert cfg.rope_parameters["rope_theta"] == want.rope_parameters["rope_theta"]
    assert head_dim_of(cfg) == head_dim_of(want)


@pytest.mark.parametrize("name", default_run(SPECS, keep=("mixtral", "qwen2-moe")))
def test_f32_file_greedy_equals_transformers(name, root):
    path, _, expected = reference(name, Q.F32, root)
    generation = harness(*load(path)).generate(PROMPTS, STEPS, chunk_size=16)
    assert_matches_reference(generation, expected, ATOL)


@pytest.mark.parametrize("name", default_run(QUANTIZED, keep=("qwen3-moe",)))
def test_quantized_file_dequantized_greedy_equals_transformers(name, root):
    path, _, expected = reference(name, QUANTIZED[name], root)
    generation = harness(*load(path)).generate(PROMPTS, STEPS, chunk_size=16)
    assert_matches_reference(generation, expected, ATOL)


@pytest.mark.parametrize("name", default_run(QUANTIZED, keep=("qwen2-moe",)))
def test_kept_quantized_experts_go_through_the_gguf_method(name, root):
    if not gguf_kernels.available():
        pytest.skip("the GGUF CPU kernels do not build here")
    qtype = QUANTIZED[name]
    path, ref, expected = reference(name, qtype, root)
    model, cfg = load(path, keep_quantized=True)
    layers = [m for n, m in model.named_modules() if isinstance(m, Linear) and ".experts." in n]
    assert bool(layers) == (name != "qwen3")
    assert all(seg.file_qtype == qtype.name for layer in layers for seg in layer.gguf_segments)
    run = harness(model, cfg)
    with torch.inference_mode():
        worst = max(max_relative_error(got, ref(torch.tensor([p])).logits[0])
                    for p, got in zip(PROMPTS, run.prefill_logits(PROMPTS)))
    assert worst < KEPT_REL_ERR
    generation = harness(model, cfg).generate(PROMPTS, STEPS, chunk_size=16)
    assert generation.tokens == [tokens for tokens, _ in expected]


@pytest.mark.parametrize("qtype", [pytest.param(Q.F32, marks=pytest.mark.slow), Q.Q8_0])
@pytest.mark.parametrize("name", default_run(TRANSFORMERS_READABLE, keep=("qwen3-moe",)))
def test_equal_to_transformers_loading_the_same_file(name, qtype, root):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_file(name, qtype, root, **TRANSFORMERS_READABLE[name])
    theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None    # the file names one: raw greedy, as ours
    generation = harness(*load(path)).generate(PROMPTS, STEPS, chunk_size=16)
    assert_matches_reference(generation, hf_reference(theirs, PROMPTS, STEPS), ATOL)
