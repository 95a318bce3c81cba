"""Speculative decoding on the real SmolLM2 weights through kvyard.Engine: greedy output equals
transformers token for token with NGRAM chains and tries (copy-heavy prompts, batch 1 and a batch,
radix hits) and
with STANDALONE drafting for itself and with a truncated-layer draft; meta_info reports it."""
from __future__ import annotations

import pytest
import torch

from kvyard import Engine
from test_engine_greedy import chat_ids

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, "
           "a notebook and a flask of tea.")
PROMPTS = [f"Repeat exactly: {PASSAGE}", "List the numbers from 1 to 20, separated by commas.",
           "Write a haiku about the sea.", f"Rewrite with 'keeper' replaced by 'guard': {PASSAGE}"]
NEW_TOKENS = 32
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def reference(hf_smollm2, hf_greedy):
    model, tokenizer = hf_smollm2
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    return prompts, [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]


def check(engine: Engine, prompts, expected) -> list[dict]:
    outs = [engine.generate(input_ids=prompts[0], sampling_params=GREEDY)]       # batch 1
    outs += engine.generate(input_ids=prompts[1:], sampling_params=GREEDY)       # a batch
    again = engine.generate(input_ids=prompts, sampling_params=GREEDY)           # radix-cache hits
    for i, (out, hit) in enumerate(zip(outs, again)):
        assert out["output_ids"] == expected[i], f"prompt {i} diverged"
        assert hit["output_ids"] == expected[i] and hit["meta_info"]["cached_tokens"] > 0, f"prompt {i} (cache hit)"
    engine.check_kv_integrity()
    return outs


@pytest.mark.parametrize("shape", [
    dict(speculative_num_steps=4),                                                    # a chain
    pytest.param(dict(speculative_num_steps=4, speculative_num_draft_tokens=10, speculative_ngram_max_bfs_breadth=4),
                 marks=pytest.mark.slow),                                             # a trie
], ids=["chain", "trie"])
def test_ngram_equals_transformers(smollm2_path, reference, shape):
    prompts, expected = reference
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=4096, log_level="warning",
                chunked_prefill_size=32, speculative_algorithm="NGRAM", **shape) as engine:
        outs = check(engine, prompts, expected)
    copied = outs[0]["meta_info"]
    assert copied["spec_verify_ct"] > 0 and copied["spec_accepted_tokens"] > 0   # the passage is copied


@pytest.fixture(scope="module")
def truncated_draft(hf_smollm2, tmp_path_factory) -> str:
    """SmolLM2 with its first 10 of 30 layers: a draft that is often, not always, right."""
    model, tokenizer = hf_smollm2
    from transformers import AutoModelForCausalLM
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = 10
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    draft.load_state_dict(model.state_dict(), strict=False)
    path = tmp_path_factory.mktemp("draft") / "smollm2-10l"
    draft.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["self", "truncated"])
def test_standalone_equals_transformers(smollm2_path, reference, truncated_draft, draft):
    prompts, expected = reference
    path = smollm2_path if draft == "self" else truncated_draft
    with Engine(model_path=smollm2_path, dtype="float32", max_total_tokens=4096, log_level="warning",
                speculative_algorithm="STANDALONE", speculative_draft_model_path=path,
                speculative_num_steps=3) as engine:
        outs = check(engine, prompts, expected)
    meta = outs[0]["meta_info"]
    if draft == "self":   # every draft accepted: 1 prefill token, 7 steps of 4, one of 3 (room left)
        assert meta["spec_verify_ct"] == 8 and meta["spec_accepted_tokens"] == 23
    else:
        assert 0 < meta["spec_accepted_tokens"] < 3 * meta["spec_verify_ct"]
