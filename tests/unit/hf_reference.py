"""Shared helpers for the model plugins' checks against transformers (float32, CPU).

``hf_reference(hf, prompts, steps)``  HF's greedy tokens and per-step logits for each prompt
``build_harness(hf, plugin_modules, backend)``  our model (same weights) + an attention backend
                                       on a forward_harness.PagedKV
``assert_matches_reference``           greedy tokens equal, step logits within an absolute tolerance
``max_relative_error``                 max |ours - hf| / max |hf| over a logits tensor
"""
from __future__ import annotations

from typing import Sequence

import torch

from forward_harness import Generation, Harness, PagedKV
from kvyard.attention import layer_features
from kvyard.layers.attention import Attention
from kvyard.model_base import ModelBuildContext
from kvyard.plugins import PluginManager


def plugin_manager(*modules) -> PluginManager:
    pm = PluginManager(autoload=False)
    for module in modules:
        pm.add_plugin(module)
    return pm


def hf_reference(hf, prompts: Sequence[Sequence[int]], steps: int) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: (greedy tokens [steps], step logits [steps, vocab]) of HF's generate."""
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            out = hf.generate(torch.tensor([list(prompt)]), max_new_tokens=steps, min_new_tokens=steps,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(prompt):].tolist()
            assert len(tokens) == steps
            outputs.append((tokens, torch.cat(out.logits)))
    return outputs


def build_harness(hf, pm: PluginManager, backend: str = "torch_native", page_size: int = 1,
                  device: str = "cpu", num_pages: int = 256) -> Harness:
    """Our model of HF model ``hf``'s architecture, loaded from its state dict, on ``backend``."""
    cfg = hf.config
    model_cls = pm.registry("model_architectures").get(type(hf).__name__)
    model = model_cls(cfg, ModelBuildContext(dtype=torch.float32, device=device))
    model.load_weights(hf.state_dict().items())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = PagedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, num_pages=num_pages // page_size,
                 page_size=page_size, seed=page_size, device=device)
    config = kv.backend_config(cfg.num_attention_heads, head_dim)
    features = layer_features(m for m in model.modules() if isinstance(m, Attention))
    config = type(config)(**{**config.__dict__, "features": features})
    return Harness(model, pm.registry("attention_backends").get(backend)(config), kv)


def assert_prefill_logits_close(harness: Harness, hf, prompts, atol: float,
                                max_rel: float | None = None) -> None:
    """One batched prefill with logits at every position, against HF's forward per prompt."""
    ours = harness.prefill_logits(prompts)
    with torch.inference_mode():
        for prompt, got in zip(prompts, ours):
            want = hf(torch.tensor([list(prompt)])).logits[0]
            if max_rel is not None:
                assert max_relative_error(got, want) <= max_rel
            torch.testing.assert_close(got, want, rtol=0, atol=atol)


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def assert_matches_reference(generation: Generation, expected, atol: float) -> None:
    for i, (tokens, logits) in enumerate(expected):
        assert generation.tokens[i] == tokens, f"prompt {i}"
        ours = torch.stack([step[i] for step in generation.logits]).cpu()
        torch.testing.assert_close(ours, logits, rtol=0, atol=atol)
