"""The built-in load formats: every yielded tensor equals what transformers holds."""
import json
from pathlib import Path

import pytest
import torch

from kvyard.loader import LoadConfig, QuantizedTensor
from kvyard.model.source import default_model_path
from kvyard.plugins import registry
from kvyard_plugins.loaders.dummy_loader import INIT_STD, DummyLoader
from kvyard_plugins.loaders.gguf_loader import GGUFLoader, _unpermute_index, hf_name_of
from kvyard_plugins.loaders.pt_loader import PtLoader
from kvyard_plugins.loaders.safetensors_loader import SafetensorsLoader

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(kind: str, **extra):
    import transformers

    config_name, model_name = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                               "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                               "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[kind]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(0)
    return model_cls(config_cls(**{**TINY, "tie_word_embeddings": False, **extra})).eval()


def save_pt(model, folder: Path, shards: int) -> None:
    """transformers 5 always writes safetensors, so the pickle layout is written by hand."""
    model.config.save_pretrained(folder)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{layout: (folder, HF model)} for tiny Llama/Qwen2 checkpoints in each on-disk layout."""
    root = tmp_path_factory.mktemp("ckpt")
    llama, qwen2 = tiny_model("llama"), tiny_model("qwen2")
    out = {}
    for name, model, save in (
        ("llama_st", llama, lambda m, d: m.save_pretrained(d)),
        ("llama_sharded", llama, lambda m, d: m.save_pretrained(d, max_shard_size="8KB")),
        ("qwen2_st", qwen2, lambda m, d: m.save_pretrained(d)),
        ("llama_pt", llama, lambda m, d: save_pt(m, d, 1)),
        ("llama_pt_sharded", llama, lambda m, d: save_pt(m, d, 3)),
    ):
        folder = root / name
        folder.mkdir()
        save(model, folder)
        out[name] = (folder, model)
    return out


def assert_matches_state_dict(pairs, model):
    expected = model.state_dict()
    got = dict(pairs)
    assert len(got) == len(pairs), "a name was yielded twice"
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_registry_lists_the_builtin_formats():
    assert {"safetensors", "pt", "gguf", "dummy"} <= set(registry("load_formats").names())
    assert registry("load_formats").get("gguf") is GGUFLoader


@pytest.mark.parametrize("layout,loader_cls", [
    ("llama_st", SafetensorsLoader), ("llama_sharded", SafetensorsLoader),
    ("qwen2_st", SafetensorsLoader), ("llama_pt", PtLoader), ("llama_pt_sharded", PtLoader)])
def test_folder_formats_yield_the_hf_state_dict(checkpoints, layout, loader_cls):
    folder, model = checkpoints[layout]
    loader = loader_cls(LoadConfig())
    assert loader_cls.can_load(str(folder))
    hf_config = loader.hf_config(str(folder))
    assert hf_config.model_type == model.config.model_type
    assert_matches_state_dict(list(loader.weights(str(folder), hf_config)), model)


def test_sharded_layouts_really_have_several_files(checkpoints):
    assert len(list(checkpoints["llama_sharded"][0].glob("*.safetensors"))) > 1
    assert len(list(checkpoints["llama_pt_sharded"][0].glob("*.bin"))) == 3


def test_float_tensors_are_cast_to_the_load_dtype(checkpoints):
    folder, model = checkpoints["llama_st"]
    loader = SafetensorsLoader(LoadConfig(dtype=torch.bfloat16))
    got = dict(loader.weights(str(folder), None))
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], model.state_dict()[name].to(torch.bfloat16))


def test_pt_reads_legacy_pickles_and_skips_rotary_buffers(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    state = {**model.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    torch.save({"lr": 1.0}, tmp_path / "training_args.bin")
    assert_matches_state_dict(list(PtLoader(LoadConfig()).weights(str(tmp_path), None)), model)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        SafetensorsLoader(LoadConfig()).hf_config(str(tmp_path))


# -- dummy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,extra", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {}), ("phi3", {"pad_token_id": None}),
    ("gemma2", {"head_dim": 8}), ("gemma3_text", {"head_dim": 8})])
def test_dummy_weights_fit_the_hf_model(tmp_path, kind, extra):
    model = tiny_model(kind, **extra)
    model.config.save_pretrained(tmp_path)
    loader = DummyLoader(LoadConfig())
    state = dict(loader.weights(str(tmp_path), loader.hf_config(str(tmp_path))))
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in state
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)


def test_dummy_weights_are_seeded_small_and_norms_are_one(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    loader = DummyLoader(LoadConfig(dtype=torch.bfloat16))
    cfg = loader.hf_config(str(tmp_path))
    first, second = dict(loader.weights(str(tmp_path), cfg)), dict(loader.weights(str(tmp_path), cfg))
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert torch.equal(first["model.norm.weight"], torch.ones(16, dtype=torch.bfloat16))
    embed = first["model.embed_tokens.weight"]
    assert embed.dtype == torch.bfloat16 and abs(embed.float().std().item() - INIT_STD) < 0.005


def test_dummy_needs_an_architecture_transformers_knows(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               architectures=["NoSuchForCausalLM"]).save_pretrained(tmp_path)
    loader = DummyLoader(LoadConfig())
    with pytest.raises(ValueError, match="load_format: dummy needs an architecture transformers knows"):
        list(loader.weights(str(tmp_path), loader.hf_config(str(tmp_path))))


def test_dummy_tokenizer_falls_back_to_the_default_model(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    loader = DummyLoader(LoadConfig())
    default = Path(default_model_path())
    source = loader.tokenizer_source(str(tmp_path))
    assert (source.path, source.kwargs) == (str(default.parent), {"gguf_file": default.name})
    (tmp_path / "tokenizer.json").write_text("{}")
    assert loader.tokenizer_source(str(tmp_path)).path == str(tmp_path)


# -- gguf -----------------------------------------------------------------------------------

def test_gguf_names_map_to_hf_names():
    assert hf_name_of("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name_of("output.weight") == "lm_head.weight"
    assert hf_name_of("output_norm.weight") == "model.norm.weight"
    assert hf_name_of("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name_of("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name_of("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name_of("rope_freqs.weight") is None


def test_unpermute_inverts_the_llama_cpp_row_order():
    # llama.cpp row 2*i + j of a head holds HF row j*half + i (rotary halves interleaved).
    heads, head_dim = 3, 8
    hf = torch.arange(heads * head_dim)
    gguf_rows = torch.empty_like(hf)
    half = head_dim // 2
    for h in range(heads):
        for i in range(half):
            for j in range(2):
                gguf_rows[h * head_dim + 2 * i + j] = hf[h * head_dim + j * half + i]
    assert torch.equal(gguf_rows[_unpermute_index(heads * head_dim, heads)], hf)


@pytest.fixture(scope="session")
def gguf_reference():
    """The bundled GGUF as transformers dequantizes it (loaded once: ~20 s)."""
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return str(path), model.config, model.state_dict()


def test_gguf_dequantized_equals_transformers(gguf_reference):
    path, hf_config, expected = gguf_reference
    loader = GGUFLoader(LoadConfig(dtype=torch.float32))
    got = dict(loader.weights(path, hf_config))
    assert loader.quantization() is None
    # The file ties lm_head to the embedding (it has no output.weight).
    assert set(got) == set(expected) - {"lm_head.weight"} and hf_config.tie_word_embeddings
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_gguf_keep_quantized_blocks_dequantize_to_the_float_path(gguf_reference):
    path, hf_config, expected = gguf_reference
    loader = GGUFLoader(LoadConfig(keep_quantized=True))
    got = dict(loader.weights(str(Path(path).parent), hf_config))  # the folder form
    assert loader.quantization() == "gguf"
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, QuantizedTensor) and q.data.dtype == torch.uint8 and q.shape == (576, 576)
    assert isinstance(got["model.norm.weight"], torch.Tensor)
    for name, value in got.items():
        dense = value.dequantize() if isinstance(value, QuantizedTensor) else value
        assert torch.equal(dense, expected[name]), name


def test_gguf_tokenizer_source_carries_the_chat_template():
    from transformers import AutoTokenizer

    source = GGUFLoader(LoadConfig()).tokenizer_source(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_gguf_folder_with_several_files_is_ambiguous(tmp_path):
    default = Path(default_model_path())
    (tmp_path / "a.gguf").symlink_to(default)
    assert GGUFLoader.can_load(str(tmp_path))
    (tmp_path / "b.gguf").symlink_to(default)
    with pytest.raises(ValueError, match="several .gguf files"):
        GGUFLoader.can_load(str(tmp_path))


def test_gguf_tensor_index_is_cached_and_maps_the_readers_tensors(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    from kvyard_plugins.loaders import gguf_loader

    monkeypatch.setenv("KVYARD_CACHE_DIR", str(tmp_path))
    path = Path(default_model_path())
    reader = gguf.GGUFReader(str(path))
    index = gguf_loader._tensor_index(path)
    assert list(tmp_path.glob("gguf/*.tensors.json"))
    monkeypatch.setattr(gguf, "GGUFReader", None)          # a later start reads no metadata
    assert gguf_loader._tensor_index(path) == index
    mapped = list(gguf_loader._mapped_tensors(path, index))
    assert len(mapped) == len(reader.tensors)
    for want, got in zip(reader.tensors, mapped):
        assert (got.name, got.tensor_type) == (want.name, int(want.tensor_type))
        assert got.data.dtype == want.data.dtype and np.array_equal(got.data, want.data), want.name
