"""Qwen3, Phi-3, Gemma 2 and Gemma 3 (text) model plugins against transformers, float32 on the CPU.

Tiny random models (transformers' own classes and configs): logits at every prompt position
close to HF's in one batched prefill (max relative error to the largest HF logit stated in
MAX_REL_ERROR), and greedy tokens equal to HF's generate for 4 prompts x 16 tokens run as one
batch, with chunked prefill (chunks of 16) and with prefix reuse (a prompt extends on top of
another's cached slots, as on a radix-cache hit). The Gemma configs have sliding windows of 8
with prompts up to 44 tokens, attention and final logit soft-caps small enough to bite, and
Gemma 3 has different rope bases for its local and global layers. Sliding-window/soft-cap runs
on each CPU attention plugin that claims them: torch_native and flex_attention here, triton
under the interpreter in test_sliding_window_triton.py; flashinfer refuses them at start-up.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import transformers

from hf_reference import (assert_matches_reference, assert_prefill_logits_close, build_harness, hf_reference,
                          plugin_manager)
from kvyard.attention import AttentionConfig
import kvyard_plugins.attention.flex_attention as flex_plugin
import kvyard_plugins.attention.torch_native as torch_native_plugin
import kvyard_plugins.models.gemma as gemma_plugin
import kvyard_plugins.models.llama as llama_plugin

STEPS = 16
ATOL = 1e-4
MAX_REL_ERROR = 1e-5
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
              pad_token_id=None, initializer_range=0.1)
_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(8)],
             "long_factor": [2.0 + i / 8 for i in range(8)], "original_max_position_embeddings": 64}
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, hidden_activation="gelu_pytorch_tanh")
CONFIGS = {
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_hidden_layers=2, head_dim=32,
                                                      tie_word_embeddings=False)),
    "qwen3-window8-tied": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
        tie_word_embeddings=True)),
    "phi3-longrope": ("Phi3ForCausalLM", "Phi3Config", dict(num_hidden_layers=2, rope_scaling=_LONGROPE)),
    "phi3-window8": ("Phi3ForCausalLM", "Phi3Config", dict(num_hidden_layers=2, sliding_window=8)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        GEMMA, num_hidden_layers=2, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
}

# p1 shares its first 20 tokens with p0 (prefix reuse); lengths straddle the 16-token chunks and
# exceed the windows of 8
_g = torch.Generator().manual_seed(1234)
P0 = torch.randint(3, 256, (37,), generator=_g).tolist()
P1 = P0[:20] + torch.randint(3, 256, (9,), generator=_g).tolist()
P2 = torch.randint(3, 256, (5,), generator=_g).tolist()
P3 = torch.randint(3, 256, (44,), generator=_g).tolist()
PROMPTS = [P0, P1, P2, P3]


def plugins():
    return plugin_manager(llama_plugin, gemma_plugin, torch_native_plugin, flex_plugin)


@lru_cache(maxsize=None)
def reference(name: str):
    arch, config_name, extra = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    hf = getattr(transformers, arch)(config).eval()
    return hf, hf_reference(hf, PROMPTS, STEPS)


def build(name: str, backend: str = "torch_native", page_size: int = 1):
    hf, _ = reference(name)
    return build_harness(hf, plugins(), backend, page_size)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_logits_every_position(name):
    hf, _ = reference(name)
    assert_prefill_logits_close(build(name), hf, PROMPTS, ATOL, MAX_REL_ERROR)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_greedy_with_chunked_prefill(name):
    _, expected = reference(name)
    assert_matches_reference(build(name).generate(PROMPTS, STEPS, chunk_size=16), expected, ATOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_on_cached_prefixes(name):
    _, expected = reference(name)
    harness = build(name, page_size=4)
    generation = harness.generate(PROMPTS, STEPS, reuse_prefix=True)
    assert (harness.kv.req_to_token[2, :20] == harness.kv.req_to_token[1, :20]).all()
    assert_matches_reference(generation, expected, ATOL)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen3-window8-tied"])
def test_sliding_window_on_flex_attention(name):
    _, expected = reference(name)
    generation = build(name, "flex_attention").generate(PROMPTS, STEPS, chunk_size=16)
    assert_matches_reference(generation, expected, ATOL)


# -- the model's declarations --------------------------------------------------------------------
def test_gemma_layers_declare_windows_caps_and_rope_per_layer_type():
    model = build("gemma3").model
    attn = [layer.self_attn.attn for layer in model.layers]
    assert [a.sliding_window for a in attn] == [8, 8, None]
    assert all(a.logit_cap is None and a.scaling == 16 ** -0.5 for a in attn)
    assert set(model.rotary) == {"sliding_attention", "full_attention"}
    assert [a.logit_cap for a in (layer.self_attn.attn for layer in build("gemma2").model.layers)] == [2.0, 2.0]


def test_a_backend_without_the_features_refuses_by_name():
    from kvyard.attention import AttentionBackend

    class Plain(AttentionBackend):
        name = "plain"
        forward_extend = forward_decode = None

    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu",
                             page_size=1, max_context_len=64, max_batch_size=4,
                             features=frozenset({"sliding_window", "logit_cap"}))
    with pytest.raises(ValueError, match="'plain' does not support attention logit soft-capping or "
                                         "sliding-window attention"):
        Plain(config)


def test_flashinfer_refuses_sliding_window_at_start_up():
    import kvyard_plugins.attention.flashinfer as flashinfer_plugin

    cls = plugin_manager(flashinfer_plugin).registry("attention_backends").get("flashinfer")
    config = AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu",
                             page_size=1, max_context_len=64, max_batch_size=4,
                             features=frozenset({"sliding_window"}))
    with pytest.raises(ValueError, match="'flashinfer' does not support sliding-window attention"):
        cls(config)


def test_phi3_fused_checkpoint_rows_must_match():
    hf, _ = reference("phi3-window8")
    model_cls = plugins().registry("model_architectures").get("Phi3ForCausalLM")
    from kvyard.model_base import ModelBuildContext
    model = model_cls(hf.config, ModelBuildContext(torch.float32, "cpu"))
    weights = dict(hf.state_dict())
    weights["model.layers.0.self_attn.qkv_proj.weight"] = weights["model.layers.0.self_attn.qkv_proj.weight"][:-1]
    with pytest.raises(ValueError, match="model.layers.0.self_attn.qkv_proj.weight"):
        model.load_weights(weights.items())
