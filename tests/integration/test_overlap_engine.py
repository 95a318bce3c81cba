"""kvyard.Engine on SmolLM2 with overlap scheduling on and off: the same tokens (greedy and seeded
sampling with n=2) and the same logprobs; the KV integrity check holds after each step."""
from __future__ import annotations

import pytest

from kvyard import Engine

PROMPTS = ["The capital of France is", "List three colors:", "def fibonacci(n):", "Once upon a time"]
GREEDY = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
SAMPLED = {"max_new_tokens": 16, "temperature": 0.9, "top_p": 0.95, "n": 2, "seed": 7, "ignore_eos": True}


def run(smollm2_path: str, disable_overlap: bool) -> dict:
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=2048, chunked_prefill_size=8,
                debug_kv_integrity=True, log_level="warning",
                disable_overlap_schedule=disable_overlap) as engine:
        assert engine.get_server_info()["overlap_schedule"] is (not disable_overlap)
        greedy = engine.generate(PROMPTS, GREEDY, return_logprob=True, top_logprobs_num=2)
        sampled = engine.generate(PROMPTS[:2], SAMPLED)
        engine.check_kv_integrity()
    return {"greedy": greedy, "sampled": sampled}


@pytest.fixture(scope="module")
def both(smollm2_path):
    return run(smollm2_path, True), run(smollm2_path, False)


def test_greedy_tokens_and_logprobs_match(both):
    plain, overlapped = (r["greedy"] for r in both)
    assert [o["output_ids"] for o in plain] == [o["output_ids"] for o in overlapped]
    assert [o["text"] for o in plain] == [o["text"] for o in overlapped]
    for a, b in zip(plain, overlapped):
        lp_a = [lp for lp, *_ in a["meta_info"]["output_token_logprobs"]]
        lp_b = [lp for lp, *_ in b["meta_info"]["output_token_logprobs"]]
        assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_seeded_samples_match(both):
    plain, overlapped = (r["sampled"] for r in both)
    assert len(plain) == len(overlapped) == 4                      # 2 prompts x n=2
    assert [o["output_ids"] for o in plain] == [o["output_ids"] for o in overlapped]
    assert plain[0]["output_ids"] != plain[1]["output_ids"]       # the n samples differ
