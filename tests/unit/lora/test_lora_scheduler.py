"""The scheduler and LoRA slots: adapters fill a fixed slot pool (LRU eviction of adapters no
admitted request uses), a batch never needs more adapters than slots (requests wait for one),
the prefix cache never shares KV between adapters, and the KV integrity check holds."""
from __future__ import annotations

import pytest

from lora_fixtures import greedy_params, make_adapters, peft_greedy, peft_model, run, tiny_base
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-sched")
    base = tiny_base("llama", str(root / "base"))
    return base, str(root / "base"), make_adapters(base, str(root))


def scheduler_for(setup, **extra):
    _, path, adapters = setup
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=512,
                      debug_kv_integrity=True, log_level="warning",
                      lora_paths=[f"{n}={p}" for n, p in adapters.items()], **extra)
    return build_scheduler(args)


class SlotSpy:
    """Records the distinct adapter slots of every launched batch."""

    def __init__(self, scheduler):
        self.batches: list[set] = []
        launch = scheduler.executor.launch

        def spy(batch, positions):
            self.batches.append({r.lora_name for r in batch.reqs if r.lora_name is not None})
            return launch(batch, positions)
        scheduler.executor.launch = spy


@pytest.mark.parametrize("overlap", [False, True])
def test_one_slot_serves_three_adapters_in_turn(setup, overlap):
    base, _, adapters = setup
    scheduler = scheduler_for(setup, max_loras_per_batch=1, max_lora_rank=8, disable_overlap_schedule=not overlap)
    spy = SlotSpy(scheduler)
    prompt = [5, 17, 33, 2, 9]
    reqs = [(f"r{i}-{name}", prompt, name) for i, name in enumerate(["qv", "all", "mlp", "qv", None])]
    got = run(scheduler, reqs, steps=4)
    assert all(len(b) <= 1 for b in spy.batches)       # never more adapters than slots
    assert len({frozenset(b) for b in spy.batches if b}) == 3   # every adapter had its turn
    for rid, _, name in reqs:
        ref = base if name is None else peft_model(base, adapters[name])
        assert got[rid][0] == peft_greedy(ref, prompt, 4)[0], rid
    lora = scheduler.runner.lora
    assert lora.pins == [0]                              # nothing pinned once idle
    assert lora.requests == {"qv": 2, "all": 1, "mlp": 1}
    scheduler.close()


def test_lru_eviction_keeps_pinned_slots(setup):
    scheduler = scheduler_for(setup, max_loras_per_batch=2, max_lora_rank=8)
    lora = scheduler.runner.lora
    a = lora.acquire("qv")
    b = lora.acquire("all")
    assert {a, b} == {0, 1} and lora.acquire("mlp") is None   # both slots pinned: held back
    lora.release(a)
    assert lora.acquire("mlp") == a and "qv" not in lora.slot_of   # the unpinned one is evicted
    lora.release(b)
    assert lora.acquire("qv") == b                                  # LRU: "all" was used least recently
    assert lora.acquire(None) == -1                                 # the base model needs no slot
    scheduler.close()


def test_prefix_cache_is_keyed_by_adapter(setup):
    scheduler = scheduler_for(setup, max_loras_per_batch=2, max_lora_rank=8)
    prompt = list(range(3, 40))
    cached = {}

    def one(rid, name):
        scheduler.add_request(TokenizedGenerateReq(rid, prompt, greedy_params(2), lora_name=name))
        while scheduler.has_work():
            for u in scheduler.step():
                if u.finished_reason is not None:
                    cached[rid] = u.cached_tokens
    one("a1", "qv")
    one("b1", "all")       # same prompt, other adapter: nothing shared
    one("base", None)      # nor with the base model
    one("a2", "qv")        # the same adapter again: its own prefix is reused
    assert cached["a1"] == 0 and cached["b1"] == 0 and cached["base"] == 0
    assert cached["a2"] >= len(prompt) - 1
    scheduler.check_integrity()
    scheduler.close()


def test_unknown_adapter_and_lora_off_are_refused(setup):
    scheduler = scheduler_for(setup, max_lora_rank=8)
    rejected = scheduler.add_request(TokenizedGenerateReq("x", [1, 2, 3], greedy_params(2), lora_name="nope"))
    assert rejected.finished_reason["message"] == "lora_path: unknown LoRA adapter 'nope'"
    scheduler.close()
    _, path, _ = setup
    plain = build_scheduler(ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True,
                                       max_total_tokens=256, log_level="warning"))
    rejected = plain.add_request(TokenizedGenerateReq("y", [1, 2, 3], greedy_params(2), lora_name="qv"))
    assert "--enable-lora" in rejected.finished_reason["message"]
    plain.close()
