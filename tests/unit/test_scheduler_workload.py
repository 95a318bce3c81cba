"""A randomized workload through the in-process Scheduler: shared prefixes, chunked prefill,
aborts, and a KV pool small enough to force eviction and retraction. The KV integrity check runs
after every step; finished greedy requests must still equal transformers; no slot leaks."""
from __future__ import annotations

import random

import pytest

from kvyard.io_struct import TokenizedGenerateReq
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler_process import build_scheduler
from kvyard.server_args import ServerArgs


def make_params(max_new: int) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True})
    p.verify(256)
    return p.normalize(None)


@pytest.mark.parametrize("page_size, radix", [(1, True), (4, True), (1, False)])
def test_random_workload_with_aborts_and_retractions(tiny_models, hf_greedy, page_size, radix):
    path, hf_model = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=320,
                      page_size=page_size, chunked_prefill_size=24, disable_radix_cache=not radix,
                      max_running_requests=12, debug_kv_integrity=True, log_level="warning")
    scheduler = build_scheduler(args)
    rng = random.Random(page_size * 10 + radix)
    stems = [[rng.randrange(1, 256) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
    prompts, finished, aborted = {}, {}, set()
    next_id = 0
    for step in range(2000):
        if next_id < 200 and rng.random() < 0.5:
            ids = rng.choice(stems) + [rng.randrange(1, 256) for _ in range(rng.randrange(1, 30))]
            rid = f"r{next_id}"
            prompts[rid] = ids
            scheduler.add_request(TokenizedGenerateReq(rid, ids, make_params(rng.randrange(1, 24))))
            next_id += 1
        updates = scheduler.step()
        if rng.random() < 0.05 and next_id:
            victim = f"r{rng.randrange(next_id)}"
            if victim not in finished:
                updates += scheduler.abort(victim)
        for u in updates:
            if u.finished_reason is not None:
                if u.finished_reason["type"] == "abort":
                    aborted.add(u.rid)
                else:
                    finished[u.rid] = (u.completion_tokens, u)
        if next_id >= 200 and not scheduler.has_work():
            break
    assert not scheduler.has_work()
    assert len(finished) + len(aborted) == 200
    assert scheduler.stats["retractions"] > 0, "the pool was meant to force retractions"
    scheduler.check_integrity()
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens  # nothing leaked
    # Greedy outputs of finished requests (retracted or not) equal transformers.
    outputs = {}
    for rid, req_ids in _collect_outputs(scheduler, prompts, finished).items():
        outputs[rid] = req_ids
    for rid in rng.sample(sorted(outputs), 20):
        n = len(outputs[rid])
        assert outputs[rid] == hf_greedy(hf_model, prompts[rid], n), rid


def _collect_outputs(scheduler, prompts, finished):
    # The final update of a non-streaming request carries all its tokens.
    return {rid: list(u.new_token_ids) for rid, (_, u) in finished.items()}


def test_a_failing_step_aborts_its_requests_and_frees_their_slots(tiny_models):
    path, _ = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
                      chunked_prefill_size=-1, log_level="warning")
    scheduler = build_scheduler(args)
    real_forward = scheduler.runner.forward
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] in (1, 3):  # the first prefill and a later decode step raise
            raise RuntimeError("boom")
        return real_forward(batch)

    scheduler.runner.forward = flaky
    scheduler.add_request(TokenizedGenerateReq("a", [5, 6, 7], make_params(4)))
    failed = scheduler.step()
    assert [(u.rid, u.finished_reason["type"]) for u in failed] == [("a", "abort")]
    assert "boom" in failed[0].finished_reason["message"]
    scheduler.check_integrity()
    scheduler.add_request(TokenizedGenerateReq("b", [5, 6, 7], make_params(4)))
    scheduler.step()                        # prefill ok
    failed = scheduler.step()               # decode raises
    assert [u.rid for u in failed] == ["b"] and not scheduler.has_work()
    scheduler.check_integrity()
    scheduler.add_request(TokenizedGenerateReq("c", [5, 6, 7], make_params(4)))
    done = []
    while scheduler.has_work():
        done += scheduler.step()
    assert done[-1].finished_reason["type"] == "length" and done[-1].completion_tokens == 4
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens
