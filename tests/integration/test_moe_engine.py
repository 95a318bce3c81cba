"""MoE and DeepSeek checkpoints through the whole engine (scheduler process, radix cache,
chunked prefill): greedy output equals transformers token for token in float32, the first time
and again on prefix-cache hits."""
from __future__ import annotations

import random

import pytest

from kvyard import Engine
from moe_models import save_tiny, with_eos

PARAMS = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("moe-engine"))


def run_and_compare(path: str, hf, hf_greedy, **engine_args) -> None:
    path = with_eos(path)
    rng = random.Random(7)
    base = [rng.randrange(1, 256) for _ in range(20)]
    prompts = [base + [rng.randrange(1, 256) for _ in range(n)] for n in (3, 17, 40, 1)]
    expected = [hf_greedy(hf, ids, 16) for ids in prompts]
    with Engine(model_path=path, dtype="float32", chunked_prefill_size=16, skip_tokenizer_init=True,
                max_total_tokens=2048, debug_kv_integrity=True, log_level="warning", **engine_args) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=PARAMS)
        assert [o["output_ids"] for o in outs] == expected
        outs = engine.generate(input_ids=prompts[::-1], sampling_params=PARAMS)   # cache hits
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs)
        assert [o["output_ids"] for o in outs] == expected[::-1]
        engine.check_kv_integrity()


def test_deepseek_v3_engine_equals_transformers(root, hf_greedy):
    run_and_compare(*save_tiny("deepseek-v3", root), hf_greedy)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v2"])
def test_engine_equals_transformers_other_architectures(root, hf_greedy, name):
    run_and_compare(*save_tiny(name, root), hf_greedy)


def test_flex_attention_refuses_the_latent_layout(root):
    path = with_eos(save_tiny("deepseek-v2", root)[0])
    with pytest.raises(Exception, match="does not serve the 'mla' KV layout"):
        Engine(model_path=path, dtype="float32", attention_backend="flex_attention",
               skip_tokenizer_init=True, max_total_tokens=512, log_level="warning")
