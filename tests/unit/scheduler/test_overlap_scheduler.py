"""Overlap scheduling (the Scheduler with an OverlapWorker executor) on the CPU: the pipeline (N+1 launched before N is processed), the extra
token of a finished request, failing steps, aborts in flight, grammar sync points, and the
ScheduleBatch / StepResult row selection it uses. Randomized workloads with aborts, on and off:
test_scheduler_workload.py."""
from __future__ import annotations

import re

import pytest
import torch

from kvyard.forward_batch import ForwardMode
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.req import Req
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs
from tiny_tokenizer import build_tokenizer

VOCAB = 256
EOS = 2


def params(max_new: int, **extra) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True, **extra})
    p.verify(VOCAB)
    return p.normalize(None)


def make(tiny_models, overlap: bool = True, tokenizer=None, **overrides):
    path, _ = tiny_models["llama"]
    settings = dict(model_path=path, dtype="float32", skip_tokenizer_init=tokenizer is None,
                    max_total_tokens=256, chunked_prefill_size=-1, debug_kv_integrity=True,
                    log_level="warning", disable_overlap_schedule=not overlap)
    scheduler = build_scheduler(ServerArgs(**{**settings, **overrides}),
                                tokenizer_factory=(lambda: tokenizer) if tokenizer else None)
    assert scheduler.config.enable_overlap == overlap
    return scheduler


def drain(scheduler, max_steps: int = 500) -> dict[str, list]:
    """Steps until idle; {rid: [tokens..., finish type]}."""
    out: dict[str, list] = {}
    for _ in range(max_steps):
        for u in scheduler.step():
            out.setdefault(u.rid, []).extend(u.new_token_ids)
            if u.finished_reason is not None:
                out[u.rid].append(u.finished_reason["type"])
        if not scheduler.has_work():
            return out
    raise AssertionError("the scheduler did not drain")


def assert_nothing_leaked(scheduler) -> None:
    scheduler.check_integrity()
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens


def record_launches(scheduler) -> list:
    launched = []
    submit = scheduler.executor.submit

    def spy(step):
        launched.append((step.batch.mode, step.has_futures, list(step.batch.input_ids)))
        submit(step)
    scheduler.executor.submit = spy
    return launched


def test_decode_runs_on_future_tokens_and_the_extra_token_is_discarded(tiny_models):
    plain = make(tiny_models, overlap=False)
    plain.add_request(TokenizedGenerateReq("a", [5, 6, 7, 8], params(3)))
    expected = drain(plain)["a"]

    scheduler = make(tiny_models)
    launched = record_launches(scheduler)
    scheduler.add_request(TokenizedGenerateReq("a", [5, 6, 7, 8], params(3)))
    assert scheduler.step() == []                     # the prefill is launched, nothing is back yet
    assert scheduler.step() == [] and scheduler._inflight is not None
    assert drain(scheduler)["a"] == expected
    # prefill, then 3 decode steps: each decode fed the token still being sampled (a future);
    # the third decode was launched before the request finished at the second, and discarded
    modes = [mode for mode, _, _ in launched]
    assert modes == [ForwardMode.EXTEND] + [ForwardMode.DECODE] * 3
    assert all(futures and ids[0] < 0 for _, futures, ids in launched[1:])
    assert scheduler.stats["generation_tokens"] == 3
    # the extra token's slot was freed, not cached: the cache holds what it holds without overlap
    # (only KV that was computed, should the batch in flight fail)
    assert scheduler.cache.evictable_size() == plain.cache.evictable_size() == 4 + 3 - 1
    assert_nothing_leaked(scheduler)
    scheduler.close()


def test_abort_while_the_prefill_is_in_flight_gives_its_slots_back(tiny_models):
    scheduler = make(tiny_models)
    scheduler.add_request(TokenizedGenerateReq("a", list(range(3, 40)), params(8)))
    scheduler.add_request(TokenizedGenerateReq("b", list(range(3, 20)), params(4)))
    scheduler.step()                                   # both prefills in flight
    used = scheduler.runner.max_total_tokens - scheduler.allocator.available()
    assert used >= 37 + 17
    [update] = scheduler.abort("a")
    assert update.finished_reason["type"] == "abort"
    scheduler.check_integrity()                        # a's in-flight KV is not cached, not owned
    assert scheduler.cache.evictable_size() == 0
    assert scheduler.runner.max_total_tokens - scheduler.allocator.available() == used - 37
    out = drain(scheduler)
    assert "a" not in out and out["b"][-1] == "length" and len(out["b"]) == 5
    assert_nothing_leaked(scheduler)
    scheduler.close()


def test_a_failing_step_aborts_only_its_requests(tiny_models):
    scheduler = make(tiny_models)
    real = scheduler.runner.forward_logits
    calls = {"n": 0}

    def flaky(fb):
        calls["n"] += 1
        if calls["n"] in (1, 3):                       # the first prefill, then b's first decode
            raise RuntimeError("boom")
        return real(fb)

    scheduler.runner.forward_logits = flaky
    scheduler.add_request(TokenizedGenerateReq("a", [5, 6, 7], params(4)))
    out = drain(scheduler)
    assert out["a"] == ["abort"]
    scheduler.add_request(TokenizedGenerateReq("b", [5, 6, 7], params(4)))
    out = drain(scheduler)
    assert out["b"][-1] == "abort"
    scheduler.add_request(TokenizedGenerateReq("c", [5, 6, 7], params(4)))
    out = drain(scheduler)
    assert out["c"][-1] == "length" and len(out["c"]) == 5
    assert_nothing_leaked(scheduler)
    scheduler.close()


def test_finish_inflight_processes_the_batch_in_flight(tiny_models):
    scheduler = make(tiny_models)
    scheduler.add_request(TokenizedGenerateReq("a", [5, 6, 7], params(1)))
    assert scheduler.step() == []
    [update] = scheduler.finish_inflight()
    assert update.rid == "a" and update.finished_reason["type"] == "length"
    assert not scheduler.has_work()
    scheduler.close()


@pytest.mark.parametrize("penalty", ["repetition_penalty", "frequency_penalty", "presence_penalty",
                                     "min_new_tokens"])
def test_penalized_requests_match_the_plain_scheduler(tiny_models, penalty):
    """Penalty state follows every token (a sync point): greedy outputs as without overlap. r1 is
    r0 without the penalty, r2 a plain request sharing the batches."""
    prompt = [5, 9, 9, 9]
    plain = make(tiny_models, overlap=False)
    plain.add_request(TokenizedGenerateReq("probe", prompt, params(12)))
    free = drain(plain)["probe"][:-1]
    stop = free[6]
    assert stop not in free[:6]
    settings = {"repetition_penalty": {"repetition_penalty": 2.0},
                "frequency_penalty": {"frequency_penalty": 2.0},
                "presence_penalty": {"presence_penalty": 2.0},
                # eos and stop tokens are blocked while fewer than 6 tokens are out: it stops at 6
                "min_new_tokens": {"min_new_tokens": 6, "stop_token_ids": [stop]}}
    outputs = []
    for overlap in (False, True):
        scheduler = make(tiny_models, overlap)
        for rid, ids, extra in (("r0", prompt, settings[penalty]), ("r1", prompt, {}), ("r2", [7, 8, 9], {})):
            scheduler.add_request(TokenizedGenerateReq(rid, ids, params(12, **extra)))
        outputs.append(drain(scheduler))
        scheduler.close()
    assert outputs[0] == outputs[1]
    if penalty == "min_new_tokens":
        assert outputs[1]["r0"] == free[:7] + ["stop"]
    else:
        assert outputs[0]["r0"] != outputs[0]["r1"], "the penalty was meant to change the output"


GRAMMARS = {"regex": ("[abc]{2,6}(12|a1)?", r"[abc]{2,6}(12|a1)?"),
            "ebnf": ('root ::= ("ab" | "ba") ("ab" | "ba")? "c"', r"(ab|ba){1,2}c")}


def test_grammar_requests_in_mixed_batches_match_the_plain_scheduler(tiny_models):
    """Grammar requests are sync points: same outputs as without overlap, each in its language."""
    tokenizer = build_tokenizer(("<unk>", "<s>", "</s>"), eos="</s>", bos="<s>")
    outputs = []
    for overlap in (False, True):
        scheduler = make(tiny_models, overlap, tokenizer, max_total_tokens=300, chunked_prefill_size=16,
                         schedule_conservativeness=0.05, random_seed=0)
        for i in range(18):
            prompt = [(i * 7 + j) % (VOCAB - 3) + 3 for j in range(10 + i)]
            kind = ("regex", "ebnf", None)[i % 3]
            extra = {kind: GRAMMARS[kind][0]} if kind else {"ignore_eos": True}
            sampling = params(24 if kind else 6 + i % 5, temperature=1.0, **extra)
            scheduler.add_request(TokenizedGenerateReq(f"r{i}", prompt, sampling, sampling_seed=i))
        outputs.append(drain(scheduler, 3000))
        assert_nothing_leaked(scheduler)
        scheduler.close()
    assert outputs[0] == outputs[1]
    for i in range(0, 18, 3):
        for kind in ("regex", "ebnf"):
            rid = f"r{i + ('regex', 'ebnf').index(kind)}"
            ids = outputs[1][rid]
            assert ids[-1] == "stop", (rid, ids)
            text = tokenizer.decode([t for t in ids[:-1] if t != EOS])
            assert re.fullmatch(GRAMMARS[kind][1], text), (rid, text)


# -- row selection ---------------------------------------------------------------------------
def test_schedule_batch_select_renumbers_rows():
    reqs = [Req(rid=f"r{i}", origin_input_ids=[1, 2, 3], sampling_params=None) for i in range(3)]
    batch = ScheduleBatch(
        mode=ForwardMode.EXTEND, reqs=reqs, input_ids=[10, 11, 20, 30, 31, 32],
        positions=[0, 1, 0, 0, 1, 2], out_cache_loc=torch.tensor([5, 6, 7, 8, 9, 10]),
        prefix_lens=[0, 0, 0], extend_lens=[2, 1, 3], sample_rows=[1, 2, 5], sample_req_idx=[0, 1, 2],
        input_logprob_rows=[(0, 0, 11), (2, 3, 31), (2, 4, 32)], sampling_info="info",
        hidden_rows=[(1, 2), (2, 3), (2, 4), (2, 5)], mixed_decodes=1)
    kept, samples, inputs, hiddens = batch.select([0, 2])
    assert kept.reqs == [reqs[0], reqs[2]] and kept.extend_lens == [2, 3]
    assert kept.input_ids == [10, 11, 30, 31, 32] and kept.positions == [0, 1, 0, 1, 2]
    assert kept.out_cache_loc.tolist() == [5, 6, 8, 9, 10]
    assert kept.sample_rows == [1, 4] and kept.sample_req_idx == [0, 1] and samples == [0, 2]
    assert kept.input_logprob_rows == [(0, 0, 11), (1, 2, 31), (1, 3, 32)] and inputs == [0, 1, 2]
    assert kept.sampling_info == "info"
    assert kept.hidden_rows == [(1, 2), (1, 3), (1, 4)] and hiddens == [1, 2, 3]
    assert kept.mixed_decodes == 1 and kept.is_mixed_decode(1) and not kept.is_mixed_decode(0)
    result = StepResult(next_ids=[1, 2, 3], logprobs=[-1.0, -2.0, -3.0], top_logprobs=None,
                        input_logprobs=[-0.1, -0.2, -0.3], hidden_states=[[0.0], [1.0], [2.0], [3.0]])
    picked = result.select(samples, inputs, hiddens)
    assert picked.hidden_states == [[1.0], [2.0], [3.0]]
    assert picked.next_ids == [1, 3] and picked.logprobs == [-1.0, -3.0] and picked.top_logprobs is None
    assert picked.input_logprobs == [-0.1, -0.2, -0.3]


@pytest.mark.parametrize("keep", [[], [1]])
def test_schedule_batch_select_of_fewer_requests(keep):
    reqs = [Req(rid=f"r{i}", origin_input_ids=[1], sampling_params=None) for i in range(2)]
    batch = ScheduleBatch(mode=ForwardMode.DECODE, reqs=reqs, input_ids=[4, 5], positions=[3, 9],
                          out_cache_loc=torch.tensor([7, 8]), prefix_lens=[3, 9], extend_lens=[1, 1],
                          sample_rows=[0, 1], sample_req_idx=[0, 1])
    kept, samples, _, _ = batch.select(keep)
    assert kept.input_ids == [batch.input_ids[i] for i in keep] and samples == keep
    assert kept.sample_rows == list(range(len(keep)))
