"""The `moe` and `deepseek` model plugins against transformers, float32 on the CPU.

Tiny random Mixtral, Qwen2-MoE (shared expert, a dense layer), Qwen3-MoE (per-head q/k norm),
OLMoE (q/k norm, clip_qkv), DeepSeek-V2 (MLA without q LoRA, group-limited greedy routing) and
DeepSeek-V3 (q LoRA, sigmoid + correction-bias grouped routing), saved with save_pretrained and
loaded from safetensors through the load-format plugin. On torch_native attention:
  prefill logits at every position within MAX_REL_ERR of transformers' (max |diff| / max |ref|;
  measured below 1e-6 for all six), and greedy tokens equal to HF generate for 4 prompts x 16
  tokens decoded together in one batch, with chunked prefill (16-token chunks) and with prefix
  reuse (prompt 1 extends on prompt 0's cached slots, as a radix-cache hit).
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from forward_harness import Harness, PagedKV
from moe_models import SPECS, load_kvyard, plugins, save_tiny
from test_llama_vs_hf import assert_matches_reference

STEPS = 16
MAX_REL_ERR = 1e-5
_g = torch.Generator().manual_seed(4321)
P0 = torch.randint(3, 256, (37,), generator=_g).tolist()
P1 = P0[:20] + torch.randint(3, 256, (9,), generator=_g).tolist()
P2 = torch.randint(3, 256, (5,), generator=_g).tolist()
P3 = torch.randint(3, 256, (23,), generator=_g).tolist()
PROMPTS = [P0, P1, P2, P3]


@lru_cache(maxsize=None)
def reference(name: str, root: str):
    """(checkpoint path, HF model, per prompt: (greedy tokens, [STEPS, vocab] step logits))."""
    path, hf = save_tiny(name, root)
    outputs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=STEPS, min_new_tokens=STEPS,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)
            outputs.append((out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)))
    return path, hf, outputs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("moe"))


def build(name: str, root: str, backend: str = "torch_native", page_size: int = 1) -> Harness:
    path, hf, _ = reference(name, root)
    pm = plugins()
    model = load_kvyard(path, hf.config, pm)
    layout = model.kv_layout() if hasattr(model, "kv_layout") else None
    cfg = hf.config
    heads = cfg.num_attention_heads
    if layout is not None:
        kv = PagedKV(layout.num_layers, layout.num_kv_heads, layout.head_dim, num_pages=512 // page_size,
                     page_size=page_size, seed=page_size, layout=layout)
        head_dim = layout.head_dim
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = PagedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, num_pages=512 // page_size,
                     page_size=page_size, seed=page_size)
    attention = pm.registry("attention_backends").get(backend)(kv.backend_config(heads, head_dim))
    return Harness(model, attention, kv)


def max_relative_error(ours: list[torch.Tensor], hf, prompts) -> float:
    worst = 0.0
    with torch.inference_mode():
        for prompt, got in zip(prompts, ours):
            ref = hf(torch.tensor([prompt])).logits[0]
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return worst


@pytest.mark.parametrize("name", sorted(SPECS))
def test_prefill_logits_close_to_hf(name, root):
    _, hf, _ = reference(name, root)
    ours = build(name, root).prefill_logits(PROMPTS)
    assert max_relative_error(ours, hf, PROMPTS) < MAX_REL_ERR


@pytest.mark.parametrize("name", sorted(SPECS))
def test_batched_greedy_with_chunked_prefill(name, root):
    _, _, expected = reference(name, root)
    generation = build(name, root).generate(PROMPTS, STEPS, chunk_size=16)
    assert_matches_reference(generation, expected)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_batched_greedy_on_a_reused_prefix(name, root):
    _, _, expected = reference(name, root)
    harness = build(name, root, page_size=4)
    generation = harness.generate(PROMPTS, STEPS, reuse_prefix=True)
    assert (harness.kv.req_to_token[2, :20] == harness.kv.req_to_token[1, :20]).all()
    assert_matches_reference(generation, expected)


def test_deepseek_pool_holds_the_latent_only(root):
    harness = build("deepseek-v2", root)
    pool, cfg = harness.kv.pool, reference("deepseek-v2", root)[1].config
    assert pool.layout.kind == "mla"
    assert pool.k_buffers[0].shape[1:] == (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert pool.v_buffers[0] is pool.k_buffers[0]


def test_registers_architectures_lazily():
    registry = plugins().registry("model_architectures")
    assert registry.entry("OlmoeForCausalLM").factory == "kvyard_plugins.models.moe_model:OlmoeForCausalLM"
    assert registry.entry("DeepseekV3ForCausalLM").factory == \
        "kvyard_plugins.models.deepseek_model:DeepseekV3ForCausalLM"


def test_missing_expert_weight_is_named(root):
    path, hf, _ = reference("qwen3-moe", root)
    model_cls = plugins().registry("model_architectures").get("Qwen3MoeForCausalLM")
    from kvyard.model_base import ModelBuildContext
    model = model_cls(hf.config, ModelBuildContext(torch.float32, "cpu"))
    from safetensors.torch import load_file
    weights = load_file(f"{path}/model.safetensors")
    del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.3.up_proj.weight"):
        model.load_weights(weights.items())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dummy_loader_names_the_checkpoint_tensors(name, root):
    """The dummy load format (benchmarks) generates exactly the checkpoint's names and shapes."""
    from safetensors import safe_open
    from kvyard_plugins.loaders.dummy_moe_shapes import moe_family_shapes

    path, hf, _ = reference(name, root)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert dict(moe_family_shapes(hf.config)) == saved
