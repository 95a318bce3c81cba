"""CPU step threads follow the cores other processes leave free: fewer while they keep cores busy,
all of them again after; never more than configured; unchanged without /proc or within a second."""
from __future__ import annotations

import os

import pytest

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
