"""The scheduler's batch log lines (SGLang's "Prefill batch." / "Decode batch."), their cadence
(--decode-log-interval), the stage timings of --show-time-cost; --prefill-max-requests and
--enable-priority-scheduling seen through them."""
from __future__ import annotations

import logging
import re

import pytest

from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs


def greedy(max_new: int) -> SamplingParams:
    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True})
    p.verify(256)
    return p.normalize(None)


def run(path: str, caplog, n: int = 3, max_new: int = 7, priorities=(), **flags) -> list[str]:
    scheduler = build_scheduler(ServerArgs(model_path=path, dtype="float32", skip_tokenizer_init=True,
                                           max_total_tokens=512, log_level="warning", **flags))
    for i in range(n):
        scheduler.add_request(TokenizedGenerateReq(f"r{i}", [5 + i, 6, 7, 8] + [9] * i, greedy(max_new),
                                                   priority=priorities[i] if priorities else 0))
    with caplog.at_level(logging.INFO, logger="kvyard.scheduler"):
        while scheduler.has_work():
            scheduler.step()
    scheduler.close()
    return [r.getMessage() for r in caplog.records if r.name == "kvyard.scheduler"]


def test_decode_log_interval_and_time_cost(tiny_models, caplog):
    path, _ = tiny_models["llama"]
    lines = run(path, caplog, decode_log_interval=2, show_time_cost=True, prefill_max_requests=2,
                num_continuous_decode_steps=1)
    prefills = [ln for ln in lines if ln.startswith("Prefill batch.")]
    decodes = [ln for ln in lines if ln.startswith("Decode batch.")]
    costs = [ln for ln in lines if re.fullmatch(r"Time cost \(ms\): schedule [\d.]+, launch [\d.]+, complete [\d.]+", ln)]
    assert [re.search(r"#new-seq: (\d+)", ln).group(1) for ln in prefills] == ["2", "1"]   # --prefill-max-requests 2
    assert re.match(r"Prefill batch\. #new-seq: 2, #new-token: 9, #cached-token: 0, token usage: [\d.]+, "
                    r"#running-req: \d+, #queue-req: 1$", prefills[0])
    assert len(decodes) == 6 // 2 and len(costs) == len(prefills) + len(decodes)
    assert re.match(r"Decode batch\. #running-req: \d+, #token: \d+, token usage: [\d.]+, "
                    r"gen throughput \(token/s\): [\d.]+, #queue-req: 0$", decodes[0])


def test_a_continuous_decode_run_counts_each_of_its_steps(tiny_models, caplog):
    """One request, 7 tokens: the prefill, then one run of 6 decode steps (continuous decode);
    the interval counts steps, at most one line per scheduler iteration."""
    path, _ = tiny_models["llama"]
    lines = run(path, caplog, n=1, decode_log_interval=4)
    decodes = [ln for ln in lines if ln.startswith("Decode batch.")]
    assert len(decodes) == 1   # the 4th step crossed the interval; the 6th ended the run before the 8th


def test_no_decode_lines_at_interval_zero(tiny_models, caplog):
    path, _ = tiny_models["llama"]
    lines = run(path, caplog, n=1, decode_log_interval=0)
    assert not [ln for ln in lines if "Decode batch." in ln or "Time cost" in ln]
    assert len([ln for ln in lines if ln.startswith("Prefill batch.")]) == 1


@pytest.mark.parametrize("low_first, priorities, order", [(False, (0, 1, 2), ["6", "5", "4"]),
                                                          (True, (1, 2, 0), ["6", "4", "5"])])
def test_priority_scheduling_admits_by_priority(tiny_models, caplog, low_first, priorities, order):
    """r0..r2 (prompts of 4, 5, 6 tokens) with the given priorities, one prefill per batch: the
    #new-token of the prefill lines tells which request each admitted."""
    path, _ = tiny_models["llama"]
    lines = run(path, caplog, max_new=2, priorities=priorities,
                prefill_only_one_req=True, enable_priority_scheduling=True,
                schedule_low_priority_values_first=low_first)
    prefills = [re.search(r"#new-token: (\d+)", ln).group(1) for ln in lines if ln.startswith("Prefill batch.")]
    assert prefills == order
