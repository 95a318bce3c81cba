"""--pp-size on the CPU: two gloo ranks, each holding a contiguous stage of the decoder layers
(hidden states sent stage to stage, logits broadcast by the last), serve the same greedy tokens
as one rank and as transformers (float32) with close logprobs, through chunked prefill and
prefix-cache hits; the KV integrity check holds on both stages."""
from __future__ import annotations

import pytest

from kvyard import Engine
from test_tensor_parallel import DENSE, logprobs, prompts, run, save_dense

NEW = 12


@pytest.mark.slow
def test_pp2_equals_pp1_and_transformers(tmp_path, hf_greedy, monkeypatch):
    monkeypatch.setitem(DENSE, "llama-3-layers", ("LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_hidden_layers=3)))
    path, hf = save_dense("llama-3-layers", tmp_path)   # stages of 2 and 1 layers
    ids = prompts()
    one, two = run(path, 1, ids), run(path, 1, ids, pp_size=2)
    assert [o["output_ids"] for o in two] == [o["output_ids"] for o in one]
    assert [o["output_ids"] for o in two] == [hf_greedy(hf, p, NEW) for p in ids]
    for a, b in zip(one, two):
        assert logprobs(b) == pytest.approx(logprobs(a), abs=1e-4)


@pytest.mark.slow
def test_a_model_without_pipeline_support_is_refused_by_name(tmp_path):
    from moe_models import save_tiny, with_eos

    path = with_eos(save_tiny("mixtral", str(tmp_path))[0])
    with pytest.raises(ValueError, match=r"pp_size: MixtralForCausalLM does not support pipeline parallelism yet"):
        Engine(model_path=path, dtype="float32", pp_size=2, skip_tokenizer_init=True, max_total_tokens=512,
               log_level="error")
