"""A randomized workload through the in-process Scheduler: shared prefixes, chunked prefill,
aborts, and a KV pool small enough to force eviction and retraction. The KV integrity check runs
after every step; finished greedy requests must still equal transformers; no slot leaks. Each
workload runs with overlap scheduling off and on: the outputs must be token-identical."""
from __future__ import annotations

import random

import pytest

from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs


def make_params(max_new: int, **extra) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True, **extra})
    p.verify(256)
    return p.normalize(None)


def sampled_params(rng: random.Random, max_new: int) -> SamplingParams:
    """Seeded sampling; some requests with penalties (overlap sync points) or logprobs."""
    extra = rng.choice([{}, {}, {"frequency_penalty": 0.5}, {"repetition_penalty": 1.3},
                        {"min_new_tokens": max_new // 2}])
    return make_params(max_new, temperature=0.8, top_p=0.95, top_k=rng.choice([-1, 20]), **extra)


def run_workload(path: str, page_size: int, radix: bool, overlap: bool, sampling: bool = False,
                 expect_retractions: bool = True, **extra):
    """200 requests arriving at random over a pool that forces eviction and retraction, with
    random aborts; the KV integrity check runs after every step. Returns (scheduler, prompts,
    {rid: final update} of requests that finished, aborted rids). ``extra``: more ServerArgs."""
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=320,
                      page_size=page_size, chunked_prefill_size=24, disable_radix_cache=not radix,
                      max_running_requests=12, debug_kv_integrity=True, log_level="warning",
                      disable_overlap_schedule=not overlap, **extra)
    scheduler = build_scheduler(args)
    assert scheduler.config.enable_overlap == overlap
    rng = random.Random(page_size * 10 + radix)
    stems = [[rng.randrange(1, 256) for _ in range(rng.randrange(8, 40))] for _ in range(6)]
    prompts, finished, aborted = {}, {}, set()
    next_id = 0
    for step in range(2000):
        if next_id < 200 and rng.random() < 0.5:
            ids = rng.choice(stems) + [rng.randrange(1, 256) for _ in range(rng.randrange(1, 30))]
            rid = f"r{next_id}"
            prompts[rid] = ids
            max_new = rng.randrange(1, 24)
            params = sampled_params(rng, max_new) if sampling else make_params(max_new)
            scheduler.add_request(TokenizedGenerateReq(  # every 5th with logprobs, every 10th prompt ones too
                rid, ids, params, sampling_seed=next_id, return_logprob=next_id % 5 == 0, top_logprobs_num=2,
                logprob_start_len=0 if next_id % 10 == 0 else -1))
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
                    finished[u.rid] = u   # a non-streaming request's final update has all its tokens
        if next_id >= 200 and not scheduler.has_work():
            break
    assert not scheduler.has_work()
    assert len(finished) + len(aborted) == 200
    assert scheduler.stats["retractions"] > 0 or not expect_retractions, "the pool was meant to force retractions"
    scheduler.check_integrity()
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens  # nothing leaked
    scheduler.close()
    return scheduler, prompts, finished, aborted


def assert_same_outputs(plain: dict, overlapped: dict) -> None:
    """Requests that finished in both runs (an abort may catch a request at another point of its
    life with overlap) have the same tokens and logprobs."""
    both = sorted(set(plain) & set(overlapped))
    assert len(both) >= 150, f"only {len(both)} requests finished in both runs"
    for rid in both:
        a, b = plain[rid], overlapped[rid]
        assert a.new_token_ids == b.new_token_ids, rid
        assert a.finished_reason == b.finished_reason, rid
        for field in ("output_token_logprobs", "input_token_logprobs"):
            pairs_a, pairs_b = getattr(a, field) or [], getattr(b, field) or []
            assert [t for _, t in pairs_a] == [t for _, t in pairs_b], (rid, field)
            assert [lp or 0.0 for lp, _ in pairs_a] == pytest.approx([lp or 0.0 for lp, _ in pairs_b], abs=1e-4)


@pytest.mark.parametrize("page_size, radix", [(1, True), (4, True), (1, False)])
def test_random_workload_with_aborts_and_retractions(tiny_models, hf_greedy, page_size, radix):
    path, hf_model = tiny_models["llama"]
    _, prompts, plain, _ = run_workload(path, page_size, radix, overlap=False)
    _, _, overlapped, _ = run_workload(path, page_size, radix, overlap=True)
    assert_same_outputs(plain, overlapped)
    # Greedy outputs of finished requests (retracted or not) equal transformers.
    rng = random.Random(page_size)
    for rid in rng.sample(sorted(plain), 20):
        ids = list(plain[rid].new_token_ids)
        assert ids == hf_greedy(hf_model, prompts[rid], len(ids)), rid


def test_seeded_sampling_workload_is_the_same_with_and_without_overlap(tiny_models):
    path, _ = tiny_models["llama"]
    _, _, plain, _ = run_workload(path, 1, True, overlap=False, sampling=True)
    _, _, overlapped, _ = run_workload(path, 1, True, overlap=True, sampling=True)
    assert_same_outputs(plain, overlapped)


def test_a_failing_step_aborts_its_requests_and_frees_their_slots(tiny_models):
    path, _ = tiny_models["llama"]
    args = ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
                      chunked_prefill_size=-1, log_level="warning", disable_overlap_schedule=True)
    scheduler = build_scheduler(args)
    real_forward = scheduler.runner.forward
    calls = {"n": 0}

    def flaky(batch, positions=None):
        calls["n"] += 1
        if calls["n"] in (1, 3):  # the first prefill and a later decode step raise
            raise RuntimeError("boom")
        return real_forward(batch, positions)

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


def test_mixed_chunk_workload_equals_transformers(tiny_models, hf_greedy, monkeypatch):
    """--enable-mixed-chunk with overlap: running requests decode inside the prefill batches
    (their tokens may still be in flight) and every greedy output still equals transformers."""
    from kvyard.scheduler.extend_builder import ExtendBatchBuilder

    path, hf_model = tiny_models["llama"]
    mixed = {"decodes": 0}
    real = ExtendBatchBuilder.add_decodes

    def counting(self, reqs, slots, tokens):
        mixed["decodes"] += len(reqs)
        return real(self, reqs, slots, tokens)

    monkeypatch.setattr(ExtendBatchBuilder, "add_decodes", counting)
    _, prompts, finished, _ = run_workload(path, 1, True, overlap=True, expect_retractions=False,
                                           enable_mixed_chunk=True)
    assert mixed["decodes"] > 200
    for rid in random.Random(7).sample(sorted(finished), 20):
        ids = list(finished[rid].new_token_ids)
        assert ids == hf_greedy(hf_model, prompts[rid], len(ids)), rid
