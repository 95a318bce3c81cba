"""The transformers side of `kvyard bench ... --compare-hf`: a config-only (dummy) folder builds
transformers' model from the config on the requested device, and the timed generate runs there."""
from __future__ import annotations

import json

import torch

from kvyard.bench.common import hf_generate_tokens_per_s, hf_model_for

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}


def test_dummy_folder_builds_from_config_and_generates(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    model = hf_model_for(str(tmp_path), torch.bfloat16, device="cpu", load_format="dummy")
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.bfloat16
    assert model.device.type == "cpu" and not model.training
    tok_s, seconds = hf_generate_tokens_per_s(model, [[5, 6, 7, 8], [9, 10, 11, 12]], output_len=3)
    assert seconds > 0 and abs(tok_s * seconds - 6) < 1e-6
