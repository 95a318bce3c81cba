"""MoE and DeepSeek through kvyard.Engine on a CUDA device (skipped elsewhere): the fused-experts
Triton kernel and, for DeepSeek, the triton attention backend on the "mla" KV layout, with CUDA
graphs on and off, greedy tokens equal to transformers (CPU, float32) for 4 prompts x 16 tokens
in one batch, with 16-token chunked prefill and again on radix-cache hits. Plus the kernel
against the torch path in bfloat16 at a real model's shapes."""
from __future__ import annotations


import pytest
import torch

from gpu_guard import require_gpu

require_gpu()

from kvyard import Engine  # noqa: E402
from kvyard.layers.moe import RoutingConfig, fused_experts_torch, select_experts  # noqa: E402
from kvyard.kernels.triton_ops.fused_moe import fused_experts  # noqa: E402
from moe_models import SPECS, save_tiny, with_eos  # noqa: E402

PARAMS = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}


MATRIX = [(name, graphs, {}) for name in sorted(SPECS) for graphs in (True, False)] + [
    ("qwen2-moe", True, {"KVYARD_TRITON_OPS": "none"}),      # the torch experts path under graphs
    ("deepseek-v2", True, {"KVYARD_TRITON_OPS": "none"})]


@pytest.mark.parametrize("name,graphs,env", MATRIX,
                         ids=[f"{n}-{'graphs' if g else 'no-graphs'}{'-torch-ops' if e else ''}" for n, g, e in MATRIX])
def test_greedy_equals_transformers_on_cuda(tmp_path, hf_greedy, monkeypatch, name, graphs, env):
    import random
    for key, value in env.items():
        monkeypatch.setenv(key, value)        # the scheduler process inherits it
    path, hf = save_tiny(name, str(tmp_path))
    rng = random.Random(3)
    base = [rng.randrange(1, 256) for _ in range(20)]
    prompts = [base + [rng.randrange(1, 256) for _ in range(n)] for n in (3, 17, 40, 1)]
    expected = [hf_greedy(hf, ids, 16) for ids in prompts]
    with Engine(model_path=with_eos(path), dtype="float32", device="cuda", attention_backend="triton",
                chunked_prefill_size=16, skip_tokenizer_init=True, max_total_tokens=2048,
                disable_cuda_graph=not graphs, debug_kv_integrity=True, log_level="warning") as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=PARAMS)
        assert [o["output_ids"] for o in outs] == expected
        outs = engine.generate(input_ids=prompts[::-1], sampling_params=PARAMS)
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs)
        assert [o["output_ids"] for o in outs] == expected[::-1]


@pytest.mark.parametrize("tokens", [1, 37, 1024])
def test_kernel_matches_torch_path_at_qwen3_moe_shapes(tokens):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    experts, hidden, inter, top_k = 128, 2048, 768, 8
    dt = torch.bfloat16
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(dt)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.02).to(dt)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * 0.02).to(dt)
    weights, ids = select_experts(torch.randn(tokens, experts, device="cuda", generator=gen),
                                  RoutingConfig(experts, top_k, renormalize=True))
    ref = fused_experts_torch(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_experts(x, w13, w2, weights, ids).float()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-2
