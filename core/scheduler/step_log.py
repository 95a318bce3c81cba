"""The scheduler's batch log lines, as SGLang prints them, and --show-time-cost's stage timings.

- every extend batch: ``Prefill batch. #new-seq: N, #new-token: T, #cached-token: C, token usage:
  U, #running-req: R, #queue-req: Q`` (plus ``#mixed-decode: D`` with --enable-mixed-chunk);
- every ``--decode-log-interval`` decode batches: ``Decode batch. #running-req: R, #token: K,
  token usage: U, gen throughput (token/s): G, #queue-req: Q`` (G: tokens the decode batches
  since the previous line generated, over the wall time since it);
- with ``--show-time-cost``, each of those lines is followed by ``Time cost (ms): schedule ..,
  launch .., complete ..``: the mean time of each stage of ``Scheduler.step`` over the steps the
  line covers (schedule: choosing the batch and allocating its KV; launch: preparing it and,
  without overlap, its forward and sampling; complete: waiting for its results and processing
  them).

Invariant: with both off (``decode_log_interval`` 0 and ``show_time_cost`` False) nothing is
timed or counted per step beyond one integer comparison.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from typing import Callable

logger = logging.getLogger("kvyard.scheduler")

STAGES = ("schedule", "launch", "complete")


class StepLog:
    def __init__(self, decode_log_interval: int = 40, show_time_cost: bool = False):
        self.interval = decode_log_interval
        self.show_time_cost = show_time_cost
        self._decode_steps = 0
        self._tokens = 0
        self._since = time.perf_counter()
        self._stage_s: dict[str, float] = defaultdict(float)
        self._stage_steps = 0

    def stage(self, name: str):
        """A context timing one stage of the current step (a no-op without --show-time-cost)."""
        if not self.show_time_cost:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stage_s[name] += time.perf_counter() - start

    def after_step(self, batch, load: Callable[[], dict]) -> None:
        """Called once per step with the batch it launched (None: none); ``load()`` gives
        Scheduler.load_info() (called only for a line)."""
        if batch is None:
            return
        self._stage_steps += 1
        if batch.mode.is_extend() and not batch.is_verify:
            self._log_prefill(batch, load())
        else:
            self._decode_steps += 1
            self._tokens += len(batch.sample_req_idx)
            if self.interval > 0 and self._decode_steps % self.interval == 0:
                self._log_decode(load())

    def more_decode_steps(self, steps: int, tokens: int, load: Callable[[], dict]) -> None:
        """Counts ``steps`` more decode steps (``tokens`` sampled) of the step just run: the
        sub-steps of a continuous decode run (core/scheduler/continuous_decode.py)."""
        before = self._decode_steps
        self._decode_steps += steps
        self._tokens += tokens
        self._stage_steps += steps        # the run's stage times cover all its sub-steps
        if self.interval > 0 and self._decode_steps // self.interval > before // self.interval:
            self._log_decode(load())

    def _log_prefill(self, batch, load: dict) -> None:
        new = len(batch.reqs) - batch.mixed_decodes
        tokens = sum(batch.extend_lens[:new])
        # a request starting its prefill here has its cached prefix as its prefix length
        cached = sum(p for r, p in zip(batch.reqs[:new], batch.prefix_lens) if p == r.cached_tokens)
        mixed = f", #mixed-decode: {batch.mixed_decodes}" if batch.mixed_decodes else ""
        logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                    "#running-req: %d, #queue-req: %d%s", new, tokens, cached, load["token_usage"],
                    load["num_running_reqs"], load["num_queue_reqs"], mixed)
        self._log_time_cost()

    def _log_decode(self, load: dict) -> None:
        now = time.perf_counter()
        throughput = self._tokens / max(now - self._since, 1e-9)
        logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): "
                    "%.2f, #queue-req: %d", load["num_running_reqs"], load["num_used_tokens"], load["token_usage"],
                    throughput, load["num_queue_reqs"])
        self._tokens, self._since = 0, now
        self._log_time_cost()

    def _log_time_cost(self) -> None:
        if not self.show_time_cost or not self._stage_steps:
            return
        n = self._stage_steps
        logger.info("Time cost (ms): %s", ", ".join(f"{s} {1000 * self._stage_s[s] / n:.2f}" for s in STAGES))
        self._stage_s.clear()
        self._stage_steps = 0
