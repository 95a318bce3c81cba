"""Adapter folders that do not fit are refused with one line naming the adapter and what does
not fit; the --lora-paths forms parse as SGLang's."""
from __future__ import annotations

import json

import pytest

from lora_fixtures import save_adapter, tiny_base
from kvyard.lora.config import LoRAError, normalize_target_modules, parse_lora_paths
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-adapter")
    base = tiny_base("llama", str(root / "base"))
    scheduler = build_scheduler(ServerArgs(model_path=str(root / "base"), dtype="float32", skip_tokenizer_init=True,
                                           max_total_tokens=256, log_level="warning", enable_lora=True,
                                           max_lora_rank=4, lora_target_modules=["q_proj", "v_proj", "o_proj"]))
    yield base, root, scheduler.runner.lora
    scheduler.close()


def refusal(lora, name, path) -> str:
    with pytest.raises(LoRAError) as info:
        lora.load(name, str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"adapter {name!r}") or message.startswith("lora_name")
    return message


def test_refusals(lora, tmp_path):
    base, root, manager = lora
    save_adapter(base, tmp_path / "big", rank=8, alpha=8, modules=["q_proj"])
    assert "rank 8" in refusal(manager, "big", tmp_path / "big") and "--max-lora-rank 4" in refusal(manager, "big", tmp_path / "big")
    save_adapter(base, tmp_path / "mlp", rank=2, alpha=8, modules=["down_proj"])
    assert "down_proj, which is not among the server's --lora-target-modules" in refusal(manager, "mlp", tmp_path / "mlp")
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    save_adapter(wide, tmp_path / "wide", rank=2, alpha=4, modules=["q_proj"])
    assert "a different base model" in refusal(manager, "wide", tmp_path / "wide")
    deep = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    save_adapter(deep, tmp_path / "deep", rank=2, alpha=4, modules=["q_proj"])
    assert "model.layers.2.self_attn.q_proj has no LoRA-capable layer" in refusal(manager, "deep", tmp_path / "deep")
    # malformed folders
    assert "is not a folder" in refusal(manager, "missing", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in refusal(manager, "empty", tmp_path / "empty")
    bad = tmp_path / "bad-json"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in refusal(manager, "bad-json", bad)
    save_adapter(base, tmp_path / "trunc", rank=2, alpha=4, modules=["q_proj"])
    weights = tmp_path / "trunc" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "cannot read the adapter weights" in refusal(manager, "trunc", tmp_path / "trunc")
    save_adapter(base, tmp_path / "dora", rank=2, alpha=4, modules=["q_proj"])
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "use_dora=True is not supported" in refusal(manager, "dora", tmp_path / "dora")
    assert manager.adapters == {}           # nothing half-loaded
    save_adapter(base, tmp_path / "ok", rank=4, alpha=4, modules=["q_proj", "v_proj"])
    manager.load("ok", str(tmp_path / "ok"))
    assert "already loaded" in refusal(manager, "ok", tmp_path / "ok")
    manager.unload("ok")


def test_lora_paths_forms():
    assert parse_lora_paths(["a=/x/y", "/p/q/name", '{"lora_name": "j", "lora_path": "/z", "pinned": true}']) == \
        {"a": "/x/y", "name": "/p/q/name", "j": "/z"}
    assert parse_lora_paths({"k": "/v"}) == {"k": "/v"}
    with pytest.raises(LoRAError, match="given twice"):
        parse_lora_paths(["a=/x", "a=/y"])
    with pytest.raises(LoRAError, match="without ':'"):
        parse_lora_paths(["a:b=/x"])
    assert normalize_target_modules(["qkv_proj", "o_proj"]) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert len(normalize_target_modules(["all"])) == 7
    with pytest.raises(LoRAError, match="'lm_head' is not supported"):
        normalize_target_modules(["lm_head"])
    with pytest.raises(ValueError, match="max_lora_rank must be >= 1"):
        ServerArgs(enable_lora=True, max_lora_rank=0)
    assert ServerArgs(lora_paths=["a=/x"]).enable_lora     # --lora-paths implies --enable-lora
