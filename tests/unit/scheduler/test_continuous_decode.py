"""Continuous decode (core/scheduler/continuous_decode.py): several decode steps of a small batch
per scheduler iteration must give exactly the single-step output (greedy and seeded sampling),
stop at max_new_tokens, stop tokens and stop strings inside a run, stream one update per token,
give back the slots of the steps it did not take (a new message, an abort), and step aside where
it is unsafe (logprobs, penalties, a waiting request, batches over MAX_BATCH)."""
from __future__ import annotations

import pytest

from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.continuous_decode import MAX_BATCH
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 40, 41], [100, 101, 102, 103, 104, 105], [7, 7, 7]]


class IdTokenizer:
    """Each id decodes to "<id>": stop strings can name any token (the stop checker only decodes)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


def params(max_new: int, **extra) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True, **extra})
    p.verify(256)
    return p.normalize(None)


def make(tiny_models, steps: int, **overrides):
    path, _ = tiny_models["llama"]
    settings = dict(model_path=path, dtype="float32", skip_tokenizer_init=True, max_total_tokens=256,
                    chunked_prefill_size=-1, debug_kv_integrity=True, log_level="warning",
                    disable_overlap_schedule=True, num_continuous_decode_steps=steps, random_seed=0)
    scheduler = build_scheduler(ServerArgs(**{**settings, **overrides}), tokenizer_factory=IdTokenizer)
    runs = []
    real = scheduler._run_steps
    scheduler._run_steps = lambda batch: runs.append(batch.num_steps) or real(batch)
    return scheduler, runs


def submit(scheduler, n: int, max_new: int, **extra) -> None:
    for i in range(n):
        scheduler.add_request(TokenizedGenerateReq(f"r{i}", PROMPTS[i], params(max_new, **extra), sampling_seed=i))


def drain(scheduler) -> tuple[dict, int]:
    """({rid: [tokens..., finish type]}, scheduler steps taken)."""
    out: dict[str, list] = {}
    for step in range(1, 500):
        for u in scheduler.step():
            out.setdefault(u.rid, []).extend(u.new_token_ids)
            if u.finished_reason is not None:
                out[u.rid].append(u.finished_reason["type"])
        if not scheduler.has_work():
            return out, step
    raise AssertionError("the scheduler did not drain")


def assert_nothing_leaked(scheduler) -> None:
    scheduler.check_integrity()
    scheduler.cache.reset()
    assert scheduler.allocator.available() == scheduler.runner.max_total_tokens


@pytest.mark.parametrize("batch,extra", [(1, {}), (3, {}), (2, {"temperature": 0.9, "top_p": 0.9})])
def test_same_output_as_single_steps_in_fewer_iterations(tiny_models, batch, extra):
    plain, plain_runs = make(tiny_models, steps=1)
    submit(plain, batch, 19, **extra)
    expected, plain_steps = drain(plain)
    multi, runs = make(tiny_models, steps=8)
    submit(multi, batch, 19, **extra)
    got, steps = drain(multi)
    assert got == expected and all(v[-1] == "length" and len(v) == 20 for v in got.values())
    # prefill samples token 1; 18 decode tokens: runs of 8, 8 and the 2 left to max_new_tokens
    assert plain_runs == [] and runs == [8, 8, 2] and steps == plain_steps - 15
    assert multi.stats["generation_tokens"] == plain.stats["generation_tokens"]
    assert multi.cache.evictable_size() == plain.cache.evictable_size()
    assert_nothing_leaked(multi)


def test_stop_token_and_stop_string_inside_a_run(tiny_models):
    plain, _ = make(tiny_models, steps=1)
    submit(plain, 2, 30)
    free, _ = drain(plain)
    stop_token, stop_text = free["r0"][5], f"<{free['r1'][9]}>"
    first_stop = free["r0"].index(stop_token)
    first_text = next(i for i in range(30) if stop_text in IdTokenizer().decode(free["r1"][max(0, i - 3):i + 1]))
    multi, runs = make(tiny_models, steps=8)
    multi.add_request(TokenizedGenerateReq("r0", PROMPTS[0], params(30, stop_token_ids=[stop_token])))
    multi.add_request(TokenizedGenerateReq("r1", PROMPTS[1], params(30, stop=[stop_text])))
    out, _ = drain(multi)
    assert out["r0"] == free["r0"][:first_stop + 1] + ["stop"]
    assert out["r1"] == free["r1"][:first_text + 1] + ["stop"]
    assert runs and max(runs) == 8
    assert_nothing_leaked(multi)


def test_tokens_stream_one_update_per_sub_step(tiny_models):
    scheduler, runs = make(tiny_models, steps=8)
    emitted = []
    scheduler.emit = emitted.append
    scheduler.add_request(TokenizedGenerateReq("a", PROMPTS[0], params(10), stream=True))
    returned = []
    while scheduler.has_work():
        returned.append(scheduler.step())
    # prefill (1 token), a run of 8 (7 emitted as sampled, the last returned), one plain step
    assert runs == [8]
    assert [len(u.new_token_ids) for batch in emitted for u in batch] == [1] * 7
    assert [[len(u.new_token_ids) for u in ups] for ups in returned] == [[1], [1], [1]]


def test_a_new_message_ends_the_run_and_its_unused_slots_go_back(tiny_models):
    scheduler, runs = make(tiny_models, steps=8)
    scheduler.add_request(TokenizedGenerateReq("a", PROMPTS[0], params(40)))
    scheduler.step()                                           # prefill
    polls = []

    def pending() -> bool:                                     # between sub-steps: KV is consistent
        scheduler.check_integrity()
        polls.append(1)
        return len(polls) == 3
    scheduler.inbox_pending = pending
    used_before = scheduler.runner.max_total_tokens - scheduler.allocator.available()
    scheduler.step()
    req = scheduler.running[0]
    assert runs == [8] and len(req.output_ids) == 1 + 3
    # three sub-steps ran: their three slots stay with the request, the other five went back
    assert req.kv_len == len(PROMPTS[0]) + 3
    assert scheduler.runner.max_total_tokens - scheduler.allocator.available() == used_before + 3
    scheduler.check_integrity()
    [update] = scheduler.abort("a")                            # the message: an abort
    assert update.finished_reason["type"] == "abort"
    assert not scheduler.has_work()
    assert_nothing_leaked(scheduler)


@pytest.mark.parametrize("case", ["logprobs", "penalty", "waiting", "big_batch", "off"])
def test_single_steps_where_a_run_is_unsafe_or_useless(tiny_models, case):
    scheduler, runs = make(tiny_models, steps=1 if case == "off" else 8, max_running_requests=MAX_BATCH + 1)
    n = MAX_BATCH + 1 if case == "big_batch" else 1
    extra = {"logprobs": {}, "penalty": {"frequency_penalty": 0.5}}.get(case, {})
    for i in range(n):
        scheduler.add_request(TokenizedGenerateReq(f"r{i}", PROMPTS[i % 4] + [i], params(6, **extra),
                                                   return_logprob=case == "logprobs"))
    scheduler.step()
    if case == "waiting":   # admitted only after the first request's prefill: it waits for a decode step
        scheduler.add_request(TokenizedGenerateReq("late", PROMPTS[1], params(6)))
        assert scheduler._continuous_steps(scheduler.running) == 1
        scheduler.waiting.clear()
        assert scheduler._continuous_steps(scheduler.running) == 5
        return
    out, _ = drain(scheduler)
    assert runs == [] and len(out) == n
    assert_nothing_leaked(scheduler)


def test_pages_of_four_an_interrupted_run_keeps_only_the_pages_it_wrote(tiny_models):
    plain, _ = make(tiny_models, steps=1, page_size=4)
    submit(plain, 2, 23)
    expected, _ = drain(plain)
    scheduler, runs = make(tiny_models, steps=8, page_size=4)
    submit(scheduler, 2, 23)
    scheduler.step()                                           # both prefills
    polls = []
    scheduler.inbox_pending = lambda: polls.append(1) or len(polls) % 5 == 0   # every 5th sub-step: a message
    got, _ = drain(scheduler)
    assert got == expected and runs[:2] == [8, 8]
    assert_nothing_leaked(scheduler)
