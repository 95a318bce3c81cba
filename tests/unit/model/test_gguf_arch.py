"""The gguf loader's architecture mapping (plugins/loaders/gguf_arch.py): which files it maps,
the metadata it refuses by name, and llama.cpp's three expert layouts giving the same weights."""
from __future__ import annotations

import pytest
import torch

from gguf_models import Q, build_hf, write_gguf
from kvyard.loader import LoadConfig, QuantizedTensor
from kvyard_plugins.loaders import gguf_arch, gguf_loader
from kvyard_plugins.loaders.gguf_loader import GGUFLoader

QWEN3_MOE = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 2, "qwen3moe.context_length": 512,
             "qwen3moe.embedding_length": 64, "qwen3moe.feed_forward_length": 96,
             "qwen3moe.attention.head_count": 4, "qwen3moe.attention.head_count_kv": 2,
             "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6, "qwen3moe.attention.key_length": 32,
             "qwen3moe.expert_count": 6, "qwen3moe.expert_used_count": 2,
             "qwen3moe.expert_feed_forward_length": 32}
SHAPES = {"token_embd.weight": (256, 64), "output.weight": (256, 64)}


@pytest.fixture(autouse=True)
def converted_in_tmp(tmp_path, monkeypatch):
    original = gguf_loader._cache_folder
    monkeypatch.setattr(gguf_loader, "_cache_folder", lambda path, version="": tmp_path / original(path, version).name)


def test_which_files_are_mapped():
    assert gguf_arch.arch_of(QWEN3_MOE).hf_architecture == "Qwen3MoeForCausalLM"
    assert gguf_arch.arch_of({"general.architecture": "llama", "llama.expert_count": 8}).hf_architecture == \
        "MixtralForCausalLM"
    assert gguf_arch.arch_of({"general.architecture": "llama"}) is None     # transformers' path
    assert gguf_arch.arch_of({"general.architecture": "qwen2"}) is None


def test_config_fields_and_llama_cpp_defaults():
    cfg = gguf_arch.hf_config_dict(QWEN3_MOE, SHAPES)
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["head_dim"]) == \
        (6, 2, 32, 32)
    assert cfg["norm_topk_prob"] is True and cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 256
    qwen2 = {k.replace("qwen3moe", "qwen2moe"): v for k, v in QWEN3_MOE.items()}
    qwen2["general.architecture"] = "qwen2moe"
    cfg = gguf_arch.hf_config_dict(qwen2, {"token_embd.weight": (256, 64)})
    assert cfg["norm_topk_prob"] is False and cfg["shared_expert_intermediate_size"] == 96
    assert cfg["tie_word_embeddings"] is True
    assert gguf_arch.hf_config_dict({**QWEN3_MOE, "qwen3moe.expert_weights_norm": False}, SHAPES)["norm_topk_prob"] \
        is False
    yarn = {**QWEN3_MOE, "qwen3moe.rope.freq_base": 1e6, "qwen3moe.rope.scaling.type": "yarn",
            "qwen3moe.rope.scaling.factor": 4.0, "qwen3moe.rope.scaling.original_context_length": 128}
    assert gguf_arch.hf_config_dict(yarn, SHAPES)["rope_parameters"] == {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 128}


@pytest.mark.parametrize("key, value, message", [
    ("qwen3moe.expert_count", None, "lacks qwen3moe.expert_count"),
    ("qwen3moe.expert_gating_func", 2, "qwen3moe.expert_gating_func 2 is not supported yet"),
    ("qwen3moe.expert_weights_scale", 2.5, "expert_weights_scale other than 1 is not supported yet"),
    ("qwen3moe.rope.dimension_count", 16, "partial rotary"),
    ("qwen3moe.rope.scaling.type", "longrope", "rope.scaling.type 'longrope' is not supported yet"),
])
def test_unsupported_metadata_is_refused_by_name(key, value, message):
    metadata = {**QWEN3_MOE, key: value}
    with pytest.raises(ValueError, match=message):
        gguf_arch.hf_config_dict(metadata, SHAPES)


def test_expert_roles():
    assert gguf_arch.expert_roles("ffn_down_exps") == (None, ("down",))
    assert gguf_arch.expert_roles("ffn_gate_up_exps") == (None, ("gate", "up"))
    assert gguf_arch.expert_roles("ffn_up.3") == (3, ("up",))
    assert gguf_arch.expert_roles("ffn_up") is None and gguf_arch.expert_roles("ffn_gate_inp") is None


def _weights(path: str, keep_quantized: bool) -> dict:
    loader = GGUFLoader(LoadConfig(load_format="gguf", keep_quantized=keep_quantized))
    return dict(loader.weights(path, loader.hf_config(path)))


@pytest.mark.parametrize("name, layout", [("qwen3-moe", "fused"), ("mixtral", "per_expert")])
def test_every_expert_layout_gives_the_same_weights(tmp_path, name, layout):
    model = build_hf(name)
    stacked = _weights(write_gguf(model, str(tmp_path / "stacked.gguf"), Q.Q8_0), keep_quantized=True)
    other = _weights(write_gguf(model, str(tmp_path / f"{layout}.gguf"), Q.Q8_0, layout), keep_quantized=True)
    assert other.keys() == stacked.keys()
    expert = next(k for k in stacked if ".experts.1." in k and k.endswith(("up_proj.weight", "w3.weight")))
    assert isinstance(stacked[expert], QuantizedTensor) and stacked[expert].qtype == int(Q.Q8_0)
    for key, value in stacked.items():
        if isinstance(value, QuantizedTensor):
            assert value.shape == other[key].shape and torch.equal(value.data, other[key].data), key
        else:
            assert torch.equal(value, other[key]), key


def test_tokenizer_of_an_architecture_transformers_refuses(tmp_path):
    """transformers' AutoTokenizer refuses olmoe files; the loader builds the same vocabulary
    under the generic class (it tokenizes like the Qwen3-MoE file holding the same vocabulary)."""
    from transformers import AutoTokenizer

    texts = ['{"ab": 12, "c": "é"}', " a1 12"]
    ids = {}
    for name in ("olmoe", "qwen3-moe"):
        path = write_gguf(build_hf(name), str(tmp_path / f"{name}.gguf"))
        tokenizer = AutoTokenizer.from_pretrained(GGUFLoader(LoadConfig()).tokenizer_source(path).path)
        ids[name] = [tokenizer(t)["input_ids"] for t in texts]
        assert tokenizer.decode(ids[name][0]) == texts[0] and tokenizer.eos_token == "</s>"
    assert ids["olmoe"] == ids["qwen3-moe"]
