"""--tp-size on the CPU: two (or three) gloo ranks, one scheduler process each, serve the same
greedy tokens as one rank and as transformers (float32), with close logprobs, through chunked
prefill, prefix-cache hits, retraction and abort; the KV integrity check holds on every rank.

The default run keeps one case (a tiny Llama whose single KV head is replicated on both ranks
and whose vocabulary, 251, pads to 252, registered through ModelRegistry under a name of its own); the other architectures, SmolLM2 and the pool-pressure
cases are slow.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
import transformers

from kvyard import Engine
from moe_models import save_tiny, with_eos

NEW = 12
GREEDY = {"max_new_tokens": NEW, "temperature": 0.0, "ignore_eos": True}
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, attention_backend="torch_native", log_level="warning",
              chunked_prefill_size=16, debug_kv_integrity=True)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512,
              initializer_range=0.1, eos_token_id=0, bos_token_id=None, pad_token_id=None)
DENSE = {
    "llama-kv1-vocab251": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=1, vocab_size=251)),
    "qwen2-tied": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256)),
}


def save_dense(name: str, root) -> tuple[str, torch.nn.Module]:
    arch, extra = DENSE[name]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    path = str(root / name)
    model.save_pretrained(path)
    return path, model


def prompts(vocab: int = 250) -> list[list[int]]:
    """Four prompts sharing a 20-token prefix, 21 to 60 tokens: several 16-token chunks."""
    rng = random.Random(7)
    base = [rng.randrange(1, vocab) for _ in range(20)]
    return [base + [rng.randrange(1, vocab) for _ in range(n)] for n in (3, 17, 40, 1)]


def run(path: str, tp_size: int, ids: list[list[int]], **engine_args) -> list[dict]:
    """Each prompt's output, the batch run twice (the second on prefix-cache hits)."""
    with Engine(model_path=path, tp_size=tp_size, max_total_tokens=2048, **{**ENGINE, **engine_args}) as engine:
        first = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
        again = engine.generate(input_ids=ids[::-1], sampling_params=GREEDY)[::-1]
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
        assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
        engine.check_kv_integrity()          # every rank's pool
    return first


def logprobs(out: dict) -> list[float]:
    return [lp for lp, *_ in out["meta_info"]["output_token_logprobs"]]


def registered_architecture(path: str, monkeypatch) -> None:
    """The checkpoint names an architecture only ModelRegistry knows: every rank must resolve it,
    so the registration has to reach each rank's process."""
    from kvyard import ModelRegistry

    monkeypatch.setitem(ModelRegistry._extra, "TpTestLlamaForCausalLM", "kvyard_plugins.models.llama_model:LlamaForCausalLM")
    config = os.path.join(path, "config.json")
    with open(config) as f:
        data = json.load(f)
    data["architectures"] = ["TpTestLlamaForCausalLM"]
    with open(config, "w") as f:
        json.dump(data, f)


def test_tp2_equals_tp1_and_transformers(tmp_path, hf_greedy, monkeypatch):
    path, hf = save_dense("llama-kv1-vocab251", tmp_path)
    registered_architecture(path, monkeypatch)
    ids = prompts()
    # overlap scheduling on (CUDA's default): the model's collectives run on the worker thread
    # while the main thread broadcasts the scheduler messages
    one, two = run(path, 1, ids), run(path, 2, ids, disable_overlap_schedule=False)
    assert [o["output_ids"] for o in two] == [o["output_ids"] for o in one]
    assert [o["output_ids"] for o in two] == [hf_greedy(hf, p, NEW) for p in ids]
    for a, b in zip(one, two):
        assert logprobs(b) == pytest.approx(logprobs(a), abs=1e-4)


def test_tp_size_not_dividing_the_heads_is_one_line_at_start_up(smollm2_path):
    with pytest.raises(ValueError, match=r"tp_size 2 does not divide num_attention_heads \(9\)") as exc:
        Engine(model_path=smollm2_path, dtype="float32", tp_size=2, max_total_tokens=1024, log_level="error")
    assert "\n" not in str(exc.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2-tied", "qwen3", "mixtral", "qwen2-moe", "qwen3-moe"])
def test_tp2_equals_transformers_other_architectures(tmp_path, hf_greedy, name):
    if name in DENSE:
        path, hf = save_dense(name, tmp_path)
    else:
        path, hf = save_tiny(name, str(tmp_path))
        path = with_eos(path)
    ids = prompts()
    two = run(path, 2, ids)
    assert [o["output_ids"] for o in two] == [hf_greedy(hf, p, NEW) for p in ids]


@pytest.mark.slow
def test_smollm2_gguf_on_three_ranks_equals_transformers(smollm2_path, hf_smollm2, hf_greedy):
    """SmolLM2-135M has 9 heads and 3 KV heads: three ranks split it (two cannot)."""
    model, tokenizer = hf_smollm2
    ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False))
           for p in ("What is the capital of France?", "List three prime numbers.", "Write a haiku.")]
    with Engine(model_path=smollm2_path, dtype="float32", tp_size=3, max_total_tokens=2048,
                chunked_prefill_size=16, debug_kv_integrity=True, log_level="warning") as engine:
        outs = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in outs] == [hf_greedy(model, p, NEW) for p in ids]
        engine.check_kv_integrity()


@pytest.mark.slow
def test_tp2_retraction_and_abort_lose_nothing(tmp_path, hf_greedy):
    path, hf = save_dense("llama-kv1-vocab251", tmp_path)
    rng = random.Random(3)
    ids = [[rng.randrange(1, 250) for _ in range(24)] for _ in range(8)]
    params = {**GREEDY, "max_new_tokens": 40}
    # admit eagerly (schedule_conservativeness 0.05): decode runs out of slots and retracts
    with Engine(model_path=path, tp_size=2, max_total_tokens=256, max_running_requests=8,
                schedule_conservativeness=0.05, **ENGINE) as engine:
        stream = engine.generate(input_ids=[5] * 30, sampling_params={**params, "max_new_tokens": 200}, stream=True)
        next(stream)
        stream.close()                        # aborted mid-decode
        outs = engine.generate(input_ids=ids, sampling_params=params)
        assert engine.get_server_info()["retractions"] > 0, "the small pool was meant to force retractions"
        assert [o["output_ids"] for o in outs] == [hf_greedy(hf, p, 40) for p in ids]
        assert engine.get_server_info()["num_running_reqs"] == 0
        engine.check_kv_integrity()
