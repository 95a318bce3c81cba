"""Multi-LoRA batches against PEFT (float32, CPU): one batch mixing three adapters of different
ranks and target modules with the base model gives, per request, PEFT's greedy tokens with that
adapter, and logprobs close to PEFT's. The in-process Scheduler runs them (chunked prefill,
radix cache, KV integrity checked every step)."""
from __future__ import annotations

import pytest

from lora_fixtures import make_adapters, peft_greedy, peft_model, run, tiny_base
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs

STEPS = 6


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lora_setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    base = tiny_base(request.param, str(root / "base"))
    return base, str(root / "base"), make_adapters(base, str(root))


def test_mixed_batch_matches_peft(lora_setup):
    base, path, adapters = lora_setup
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512,
                      chunked_prefill_size=16, debug_kv_integrity=True, log_level="warning",
                      lora_paths=[f"{n}={p}" for n, p in adapters.items()], max_loras_per_batch=3)
    scheduler = build_scheduler(args)
    assert scheduler.runner.lora.config.max_lora_rank == 8   # the largest rank given
    prompts = {"qv": [5, 17, 33, 2, 9, 41, 7], "all": [3, 99, 14, 27, 8, 61, 22, 5, 19, 70, 11, 4, 6, 12, 90, 31, 18, 2, 7, 3],
               "mlp": [120, 7, 7, 44], None: [5, 17, 33, 2, 9, 41, 7]}   # the base shares qv's prompt
    reqs = [(f"r-{name}", prompt, name) for name, prompt in prompts.items()]
    got = run(scheduler, reqs)
    for name, prompt in prompts.items():
        ref_model = base if name is None else peft_model(base, adapters[name])
        tokens, logprobs = peft_greedy(ref_model, prompt, STEPS)
        ours_tokens, ours_logprobs = got[f"r-{name}"]
        assert ours_tokens == tokens, name
        assert ours_logprobs == pytest.approx(logprobs, abs=2e-4), name
    # the adapters matter: each changes the base model's continuation of the same prompt
    base_tokens = got["r-None"][0]
    assert got["r-qv"][0] != base_tokens
    scheduler.close()


@pytest.mark.slow
def test_smollm2_gguf_with_adapter_matches_peft(hf_smollm2, smollm2_path, tmp_path):
    """The default model (GGUF, dequantized float32) with a random adapter, next to a base request."""
    from lora_fixtures import save_adapter

    hf, tokenizer = hf_smollm2
    save_adapter(hf, str(tmp_path / "smol"), rank=8, alpha=16, modules=["q_proj", "v_proj", "down_proj"],
                 scale=0.5)
    scheduler = build_scheduler(ServerArgs(
        model_path=smollm2_path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512,
        log_level="warning", lora_paths=[f"smol={tmp_path / 'smol'}"]))
    prompt = tokenizer("The capital of France is")["input_ids"]
    got = run(scheduler, [("lora", prompt, "smol"), ("base", prompt, None)], steps=4)
    tokens, logprobs = peft_greedy(peft_model(hf, str(tmp_path / "smol")), prompt, 4)
    assert got["lora"][0] == tokens
    assert got["lora"][1] == pytest.approx(logprobs, abs=1e-3)
    base_tokens, base_logprobs = peft_greedy(hf, prompt, 4)
    assert got["base"][0] == base_tokens
    assert got["lora"][1] != pytest.approx(base_logprobs, abs=1e-2)   # the adapter matters
    scheduler.close()
