"""Engine-level greedy equality on a CUDA device (skipped elsewhere), per attention plugin, with
and without CUDA graphs, and with the fused Triton layer kernels on and off; overlap scheduling
on, or off with KVYARD_TEST_DISABLE_OVERLAP=1 (run_all.sh runs both).

Tiny random Llama-family checkpoints (tests/conftest.py) in float32 through kvyard.Engine on
cuda: chunked prefill (16), a shared prefix and a second pass on radix-cache hits, page sizes 1
and 16, against transformers' greedy continuation on the CPU in float32 (the triton kernels use
IEEE float32 dots, so float32 stays float32 on the GPU).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from gpu_guard import require_gpu

require_gpu()

from kvyard import Engine  # noqa: E402

NEW_TOKENS = 16
PARAMS = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
# tests/gpu/run_all.sh runs this file twice: overlap scheduling on (the CUDA default) and off
DISABLE_OVERLAP = os.environ.get("KVYARD_TEST_DISABLE_OVERLAP", "0") == "1"

# (id, Engine kwargs, extra environment): every plugin, graphs on/off, fused kernels on/off
CASES = [
    ("torch_native", dict(attention_backend="torch_native"), {}),
    ("triton-graphs", dict(attention_backend="triton"), {}),
    ("triton-no-graphs", dict(attention_backend="triton", disable_cuda_graph=True), {}),
    ("triton-graphs-no-padding", dict(attention_backend="triton", cuda_graph_bs=[1, 2, 4, 8],
                                      disable_cuda_graph_padding=True), {}),
    ("triton-unfused", dict(attention_backend="triton"), {"KVYARD_TRITON_OPS": "none"}),
    ("flex_attention", dict(attention_backend="flex_attention"), {}),
    ("hybrid-flex-triton", dict(prefill_attention_backend="flex_attention",
                                decode_attention_backend="triton"), {}),
]


def prompts_for(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(1, 256) for _ in range(20)]
    return [base + [rng.randrange(1, 256) for _ in range(n)] for n in (3, 17, 40, 1, 25, 9)]


# every case on llama (page size 1); page size 16 + llama3 rope, and qwen2 (biases, one more
# GQA shape), on the main paths only: each Engine start costs ~10 s. Qwen3, Phi-3, Gemma 2/3
# (sliding windows of 16 under prompts of up to 65 tokens; Gemma 2 soft-caps) on triton with
# graphs, Gemma 2 also on flex_attention and torch_native.
MATRIX = [("llama", *case) for case in CASES] + [
    ("llama3-rope", *CASES[1]), ("llama3-rope", *CASES[5]), ("qwen2", *CASES[1])] + [
    (arch, *CASES[1]) for arch in ("qwen3", "phi3", "gemma2", "gemma3")] + [
    ("gemma2", *CASES[0]), ("gemma2", *CASES[5])]


@pytest.mark.parametrize("arch,case_id,kwargs,env", MATRIX, ids=[f"{m[0]}-{m[1]}" for m in MATRIX])
def test_greedy_equals_transformers(tiny_models, hf_greedy, monkeypatch, arch, case_id, kwargs, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)        # the scheduler process inherits it
    path, hf_model = tiny_models[arch]
    prompts = prompts_for(len(arch))
    expected = [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompts]
    page_size = 16 if arch == "llama3-rope" else 1
    with Engine(model_path=path, device="cuda", dtype="float32", chunked_prefill_size=16,
                skip_tokenizer_init=True, page_size=page_size, max_total_tokens=4096,
                debug_kv_integrity=True, log_level="warning", disable_overlap_schedule=DISABLE_OVERLAP,
                **kwargs) as engine:
        assert engine.get_server_info()["overlap_schedule"] is not DISABLE_OVERLAP
        outs = engine.generate(input_ids=prompts, sampling_params=PARAMS)
        assert [o["output_ids"] for o in outs] == expected
        again = engine.generate(input_ids=prompts[::-1], sampling_params=PARAMS)   # radix hits
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert [o["output_ids"] for o in again] == expected[::-1]
        engine.check_kv_integrity()
