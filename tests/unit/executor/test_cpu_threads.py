"""CPU step threads follow the cores other processes leave free: fewer while they keep cores busy,
all of them again after; never more than configured; unchanged without /proc or within a second."""
from __future__ import annotations

import os

import pytest
import torch

from kvyard.executor.cpu_threads import FreeCoreThreads, machine_busy_ticks, own_ticks
from kvyard.server_args import ServerArgs


class FakeMachine:
    """Clock ticks at 100 Hz: ``run(seconds, others=cores, own=cores)`` advances time and counters."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0, 0

    def run(self, seconds: float, others: float, own: float) -> None:
        self.t += seconds
        self.busy += round(100 * seconds * (others + own))
        self.own += round(100 * seconds * own)


def threads_for(machine: FakeMachine, configured: int = 2):
    calls = []
    t = FreeCoreThreads(configured, interval=1.0, set_threads=calls.append,
                        busy=lambda cpus: machine.busy, own=lambda: machine.own, clock=lambda: machine.t)
    t.cpus, t.hz = {0, 1}, 100
    return t, calls


def test_a_busy_core_takes_a_thread_and_gives_it_back():
    m = FakeMachine()
    t, calls = threads_for(m)
    m.run(1.0, others=0.05, own=2.0)
    assert t.adjust() == 2 and calls == []
    m.run(1.0, others=1.0, own=1.0)      # a busy loop beside the step
    assert t.adjust() == 1 and calls == [1]
    m.run(1.0, others=1.0, own=1.0)
    assert t.adjust() == 1 and calls == [1]
    m.run(1.0, others=0.1, own=1.0)      # it stopped
    assert t.adjust() == 2 and calls == [1, 2]


def test_never_below_one_nor_above_configured_and_sampled_once_per_interval():
    m = FakeMachine()
    t, calls = threads_for(m)
    m.run(0.5, others=2.0, own=0.2)
    assert t.adjust() == 2 and calls == []   # within the interval: not measured yet
    m.run(0.6, others=2.0, own=0.2)          # a fully loaded machine
    assert t.adjust() == 1 and calls == [1]
    t.cpus = {0, 1, 2, 3}                    # more free cores than configured
    m.run(1.0, others=0.0, own=1.0)
    assert t.adjust() == 2 and calls == [1, 2]


def test_one_configured_thread_or_no_proc_keeps_the_count():
    m = FakeMachine()
    one, calls = threads_for(m, configured=1)
    m.run(2.0, others=2.0, own=1.0)
    assert one.adjust() == 1 and calls == []
    blind = FreeCoreThreads(2, set_threads=calls.append, busy=lambda cpus: None, own=lambda: None,
                            clock=lambda: m.t)
    m.run(5.0, others=2.0, own=1.0)
    assert blind.adjust() == 2 and calls == []


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc")
def test_proc_readers_count_this_process_within_the_machine():
    cpus = os.sched_getaffinity(0)
    mine_before, all_before = own_ticks(), machine_busy_ticks(cpus)
    x = 0
    for i in range(3_000_000):
        x += i
    mine, everything = own_ticks() - mine_before, machine_busy_ticks(cpus) - all_before
    assert mine > 0 and everything >= mine - 2   # tick rounding between the two files


def test_the_flag_turns_adaptation_off():
    assert ServerArgs().runner_config().adapt_cpu_threads is True
    assert ServerArgs(disable_cpu_thread_adaptation=True).runner_config().adapt_cpu_threads is False


# -- the numbers do not follow the thread count ---------------------------------------------------

# token ids of two prompts: 40 tokens (their prefill takes the GGUF dense path in two activation
# blocks) and 17 (one block)
THREAD_PROMPTS = [[(37 * i) % 4000 + 100 for i in range(40)], [(53 * i) % 3000 + 900 for i in range(17)]]


def step_logits(model_path: str, monkeypatch, threads=None, adapt: bool = False) -> list[torch.Tensor]:
    """The logits of every step of THREAD_PROMPTS, one request at a time, greedy, in the default
    model's dtype (auto: bfloat16 where the CPU multiplies it natively). ``threads(i)``: the thread
    count step i runs with; ``adapt``: the adaptation on, its measurement replaced by a machine
    whose free cores alternate between 2 and 1 every step."""
    from kvyard.executor.model_runner import ModelRunner
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq
    from kvyard.scheduler.process import build_scheduler

    logits, forward_logits = [], ModelRunner.forward_logits

    def recorded(self, fb):
        if threads is not None:
            torch.set_num_threads(threads(len(logits)))
        out = forward_logits(self, fb)
        logits.append(out.float().clone())
        return out

    def alternate(self):
        self.threads = 1 if self.threads == 2 else 2
        self.set_threads(self.threads)
        return self.threads

    before = torch.get_num_threads()
    with monkeypatch.context() as patch:
        patch.setattr(ModelRunner, "forward_logits", recorded)
        patch.setattr(FreeCoreThreads, "adjust", alternate)
        sched = build_scheduler(ServerArgs(model_path=model_path, skip_tokenizer_init=True, max_total_tokens=1024,
                                           num_threads=2, disable_cpu_thread_adaptation=not adapt,
                                           log_level="warning"))
        try:
            for i, ids in enumerate(THREAD_PROMPTS):
                p = SamplingParams.from_dict({"max_new_tokens": 5, "temperature": 0, "ignore_eos": True})
                sched.add_request(TokenizedGenerateReq(f"r{i}", ids, p.normalize(None)))
                while sched.has_work():
                    sched.step()
        finally:
            sched.close()
            torch.set_num_threads(before)
    return logits


def test_default_model_logits_equal_on_one_and_two_threads_and_with_adaptation(smollm2_path, monkeypatch):
    """Every step's logits, prefill and decode, bit for bit: on 1 thread, on 2, switching between
    them step by step (what the adaptation does on a busy machine), and with the adaptation on.
    No reduction may be split by the thread count (the GGUF dense path's gemm once was: greedy
    tokens of the default model then changed with --disable-cpu-thread-adaptation)."""
    one = step_logits(smollm2_path, monkeypatch, threads=lambda i: 1)
    runs = {"two": step_logits(smollm2_path, monkeypatch, threads=lambda i: 2),
            "switching": step_logits(smollm2_path, monkeypatch, threads=lambda i: 1 + i % 2),
            "adaptation": step_logits(smollm2_path, monkeypatch, adapt=True)}
    assert len(one) == 2 * 5
    for name, run in runs.items():
        assert len(run) == len(one), name
        for step, (a, b) in enumerate(zip(one, run)):
            assert torch.equal(a, b), f"{name}: step {step} differs by {(a - b).abs().max().item()}"
