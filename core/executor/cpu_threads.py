"""CPU step threads from the cores other processes leave free.

OpenMP threads of one step wait for each other at every parallel region. When another process
keeps one of two cores busy, the thread that shares its core runs in time slices and the other
waits for it: a batch-1 decode step took 25-90 ms on two threads there, 14 ms on one
(docs/performance.md). So between steps, at most once per ``interval`` seconds, ``FreeCoreThreads``
reads how much CPU time the rest of the machine used on this process's cores (/proc/stat minus
/proc/self/stat) and runs on ``max(1, round(free cores))`` threads, never more than configured,
back up when the other work stops. Without /proc (not Linux) the count stays as configured.

Invariant: the count only changes between steps, in the thread that runs them (OpenMP's thread
count is that thread's setting). It changes speed, not results: kvyard's CPU kernels sum every
value in an order the shapes fix (docs/architecture.md; float weights, multiplied by torch's own
gemm, are not there yet).
Off: ``--disable-cpu-thread-adaptation``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal ...
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def machine_busy_ticks(cpus: set[int]) -> Optional[int]:
    """Busy clock ticks of ``cpus`` since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            lines = fh.readlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            cols = rest.split()
            total += sum(int(cols[i]) for i in _BUSY_COLUMNS if i < len(cols))
    return total


def own_ticks() -> Optional[int]:
    """This process's user + system clock ticks (all its threads), or None without /proc."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15 of the line)


class FreeCoreThreads:
    """Call ``adjust()`` before each CPU step; it returns the thread count to run with."""

    def __init__(self, configured: int, interval: float = 1.0,
                 set_threads: Optional[Callable[[int], None]] = None,
                 busy: Callable[[set[int]], Optional[int]] = machine_busy_ticks,
                 own: Callable[[], Optional[int]] = own_ticks, clock: Callable[[], float] = time.monotonic):
        import torch

        self.configured, self.interval = configured, interval
        self.set_threads = set_threads or torch.set_num_threads
        self.busy, self.own, self.clock = busy, own, clock
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.threads = configured
        self._last = self._sample()

    def _sample(self) -> Optional[tuple[float, int, int]]:
        busy, own = self.busy(self.cpus), self.own()
        return None if busy is None or own is None else (self.clock(), busy, own)

    def adjust(self) -> int:
        if self.configured <= 1 or self._last is None or self.clock() - self._last[0] < self.interval:
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        seconds = now[0] - self._last[0]
        others = max(0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / (self.hz * seconds)
        self._last = now
        free = len(self.cpus) - others
        target = max(1, min(self.configured, int(free + 0.5)))
        if target != self.threads:
            logger.debug("CPU threads: %d -> %d (other processes kept %.1f of %d cores busy)",
                        self.threads, target, others, len(self.cpus))
            self.set_threads(target)
            self.threads = target
        return self.threads
