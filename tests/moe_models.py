"""Tiny random MoE / DeepSeek checkpoints for the tests (unit and integration).

Each spec is (HF architecture, config overrides). ``save_tiny`` builds it with a fixed seed and
save_pretrained()s it as safetensors; ``load_kvyard`` loads that folder the way the engine does
(the safetensors load-format plugin, then the model plugin's load_weights).

DeepSeek-V2 runs YaRN rope with mscale_all_dim (the softmax scale changes too), as
DeepSeek-V2-Lite does. The DeepSeek-V3 spec gives its routers a random e_score_correction_bias (HF initialises it to
zeros, which would leave the bias path untested).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers

from kvyard.loader import LoadConfig
from kvyard.model_base import ModelBuildContext
from kvyard.plugins import PluginManager

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
              initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=None)
_MLA = dict(num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=24, v_head_dim=20, moe_intermediate_size=32, first_k_dense_replace=1,
            num_experts_per_tok=2, n_shared_experts=1, n_routed_experts=8, n_group=4, topk_group=2)

SPECS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                              norm_topk_prob=False)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                              norm_topk_prob=True, head_dim=32)),
    "olmoe": ("OlmoeForCausalLM", dict(num_experts=6, num_experts_per_tok=2, clip_qkv=2.0)),
    "deepseek-v2": ("DeepseekV2ForCausalLM", dict(_MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                                                  routed_scaling_factor=1.5, rope_scaling={
                                                      "type": "yarn", "factor": 4.0, "mscale": 0.707,
                                                      "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                                      "original_max_position_embeddings": 128})),
    "deepseek-v3": ("DeepseekV3ForCausalLM", dict(_MLA, q_lora_rank=48, routed_scaling_factor=2.5,
                                                  norm_topk_prob=True)),
}


def build_hf(name: str):
    arch, extra = SPECS[name]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    if arch == "DeepseekV3ForCausalLM":
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def save_tiny(name: str, root: str):
    """(checkpoint folder, HF model) of the tiny ``name`` model saved under ``root``."""
    model = build_hf(name)
    path = os.path.join(root, name)
    model.save_pretrained(path)
    return path, model


def plugins() -> PluginManager:
    import kvyard_plugins.attention.torch_native as torch_native
    import kvyard_plugins.attention.triton as triton_attention
    import kvyard_plugins.loaders as loaders
    import kvyard_plugins.models.deepseek as deepseek
    import kvyard_plugins.models.moe as moe

    pm = PluginManager(autoload=False)
    for module in (moe, deepseek, torch_native, triton_attention, loaders):
        pm.add_plugin(module)
    return pm


def load_kvyard(path: str, hf_config: Any, pm: PluginManager, quantization=None) -> Any:
    """The kvyard model of the checkpoint at ``path`` (float32, CPU), through the safetensors
    load-format plugin."""
    loader = pm.registry("load_formats").get("safetensors")(LoadConfig(load_format="safetensors"))
    arch = hf_config.architectures[0]
    model = pm.registry("model_architectures").get(arch)(
        hf_config, ModelBuildContext(torch.float32, "cpu", quantization))
    model.load_weights(loader.weights(path, hf_config))
    return model.eval()


def with_eos(path: str) -> str:
    """The tiny configs have no eos id (HF generate must not stop early); the engine needs one,
    and requests with ignore_eos keep it from stopping."""
    config = os.path.join(path, "config.json")
    with open(config) as f:
        data = json.load(f)
    data["eos_token_id"] = 0
    with open(config, "w") as f:
        json.dump(data, f)
    return path
