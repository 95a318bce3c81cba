"""Greedy equality with transformers through kvyard.Engine on the other attention plugins:
flex_attention on SmolLM2, triton (Triton CPU interpreter) and a prefill/decode hybrid on tiny
random Llamas; each with chunked prefill and a second pass on radix-cache hits."""
from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("triton")
# The Engine runs the model in a spawned process that inherits this environment.
os.environ["TRITON_INTERPRET"] = "1"

from kvyard import Engine  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
]
NEW_TOKENS = 16
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))


def assert_greedy_twice(engine: Engine, prompts: list[list[int]], expected: list[list[int]], params: dict):
    """A mixed batch, then the same prompts in reverse order, which now hit the radix cache."""
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    for i, (out, want) in enumerate(zip(outs, expected)):
        assert out["output_ids"] == want, f"prompt {i} diverged"
    again = engine.generate(input_ids=prompts[::-1], sampling_params=params)
    for i, (out, want) in enumerate(zip(again, expected[::-1])):
        assert out["meta_info"]["cached_tokens"] > 0, f"prompt {i} missed the cache"
        assert out["output_ids"] == want, f"prompt {i} diverged on a cache hit"
    engine.check_kv_integrity()


def test_smollm2_flex_attention_equals_transformers(smollm2_path, hf_smollm2, hf_greedy):
    model, tokenizer = hf_smollm2
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    expected = [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]
    with Engine(model_path=smollm2_path, dtype="float32", attention_backend="flex_attention",
                chunked_prefill_size=16, max_total_tokens=4096, debug_kv_integrity=True,
                log_level="warning") as engine:
        assert engine.get_server_info()["attention_backend"] == "flex_attention"
        assert_greedy_twice(engine, prompts, expected, GREEDY)


def tiny_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(1, 256) for _ in range(20)]   # a shared prefix: radix hits across prompts
    return [base + [rng.randrange(1, 256) for _ in range(n)] for n in (3, 17, 40, 1)]


@pytest.mark.parametrize("arch,page_size,backends", [
    ("llama3-rope", 16, dict(attention_backend="triton")),
    # the interpreter makes each of these ~30-60 s on 2 cores: on demand (-m slow)
    pytest.param("llama", 1, dict(attention_backend="triton"), marks=pytest.mark.slow),
    pytest.param("qwen2", 4, dict(attention_backend="torch_native", decode_attention_backend="triton"),
                 marks=pytest.mark.slow),
])
def test_tiny_models_on_triton_equal_transformers(tiny_models, hf_greedy, arch, page_size, backends):
    path, hf_model = tiny_models[arch]
    prompts = tiny_prompts(page_size)
    expected = [hf_greedy(hf_model, ids, 12) for ids in prompts]
    params = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    with Engine(model_path=path, dtype="float32", chunked_prefill_size=16, skip_tokenizer_init=True,
                page_size=page_size, max_total_tokens=2048, debug_kv_integrity=True,
                triton_attention_num_kv_splits=2, log_level="warning", **backends) as engine:
        assert "triton" in engine.get_server_info()["attention_backend"]
        assert_greedy_twice(engine, prompts, expected, params)
