"""MoE GGUF files through the whole engine (`--model-path x.gguf`: config and tokenizer converted
from the file, scheduler process, radix cache, 16-token chunked prefill, --debug-kv-integrity):
greedy output equals transformers holding the file's (dequantized) weights, the first time and
again on prefix-cache hits.

Default run: a Q8_0 Qwen3-MoE file with its experts kept quantized (--quantization gguf), one
prompt given as text through the tokenizer converted from the file. Slow: a Mixtral F32 file and
an OLMoE Q4_0 file with --dtype float32 alone (the exact dequantized path).
"""
from __future__ import annotations

import os
import random

import pytest

from gguf_models import Q, dequantized_copy, save_tiny_gguf
from kvyard import Engine

PARAMS = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("gguf-moe-engine"))


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    base = [rng.randrange(3, 256) for _ in range(20)]
    return [base + [rng.randrange(3, 256) for _ in range(n)] for n in (3, 17, 40, 1)]


def run_and_compare(path: str, ref, hf_greedy, text: str | None = None, **engine_args) -> None:
    ids = prompts()
    expected = [hf_greedy(ref, p, 16) for p in ids]
    with Engine(model_path=path, chunked_prefill_size=16, max_total_tokens=2048, debug_kv_integrity=True,
                log_level="warning", **engine_args) as engine:
        outs = engine.generate(input_ids=ids, sampling_params=PARAMS)
        assert [o["output_ids"] for o in outs] == expected
        outs = engine.generate(input_ids=ids[::-1], sampling_params=PARAMS)    # cache hits
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs)
        assert [o["output_ids"] for o in outs] == expected[::-1]
        if text is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
            out = engine.generate(prompt=text, sampling_params=PARAMS)
            assert out["output_ids"] == hf_greedy(ref, tokenizer(text)["input_ids"], 16)
        engine.check_kv_integrity()


def test_qwen3_moe_q8_0_experts_kept_quantized(root, hf_greedy):
    path, hf = save_tiny_gguf("qwen3-moe", root, Q.Q8_0)
    run_and_compare(path, dequantized_copy(hf, path), hf_greedy, text='{"ab": 12, "c": "é"}',
                    dtype="float32", quantization="gguf")


@pytest.mark.slow
@pytest.mark.parametrize("name, qtype", [("mixtral", Q.F32), ("olmoe", Q.Q4_0)])
def test_dtype_float32_dequantizes(root, hf_greedy, name, qtype):
    """--dtype float32 without --quantization: the exact dequantized path, also for a quantized file."""
    path, hf = save_tiny_gguf(name, root, qtype)
    run_and_compare(path, hf if qtype == Q.F32 else dequantized_copy(hf, path), hf_greedy, dtype="float32")
