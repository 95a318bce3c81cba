"""torch.profiler around the scheduler's steps, started and stopped by control ops
(/start_profile and /stop_profile, Engine.start_profile / stop_profile, `--profile` of the
benchmarks). The trace is a Chrome trace JSON in the output directory: the request's
``output_dir``, else $KVYARD_TORCH_PROFILER_DIR, else $SGLANG_TORCH_PROFILER_DIR, else /tmp.

Invariant: at most one profile runs; with ``num_steps`` it stops itself after that many busy
scheduler steps (the trace is written then), otherwise at stop().
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

logger = logging.getLogger(__name__)

ENV_VARS = ("KVYARD_TORCH_PROFILER_DIR", "SGLANG_TORCH_PROFILER_DIR")
ACTIVITIES = ("CPU", "GPU")


def profiler_dir(output_dir: Optional[str] = None) -> str:
    for value in (output_dir, *(os.environ.get(v) for v in ENV_VARS)):
        if value:
            return value
    return "/tmp"


class StepProfiler:
    def __init__(self):
        self._prof = None
        self._dir = ""
        self._steps_left: Optional[int] = None
        self.last_trace: Optional[str] = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self, output_dir: Optional[str] = None, num_steps: Optional[int] = None,
              activities: Optional[list[str]] = None, record_shapes: bool = False,
              with_stack: bool = False) -> str:
        """Starts profiling; ValueError naming the field for a bad argument. Returns the directory."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self._prof is not None:
            raise ValueError("a profile is already running; stop it first")
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        wanted = [a.upper() for a in (activities or ACTIVITIES)]
        unknown = [a for a in wanted if a not in ACTIVITIES]
        if unknown:
            raise ValueError(f"activities: unknown {unknown[0]!r} (known: {', '.join(ACTIVITIES)})")
        acts = [ProfilerActivity.CPU] if "CPU" in wanted else []
        if "GPU" in wanted and torch.cuda.is_available():
            acts.append(ProfilerActivity.CUDA)
        self._dir = profiler_dir(output_dir)
        os.makedirs(self._dir, exist_ok=True)
        self._prof = profile(activities=acts, record_shapes=record_shapes, with_stack=with_stack)
        self._prof.start()
        self._steps_left = num_steps
        logger.info("profiling started; traces go to %s", self._dir)
        return self._dir

    def after_step(self) -> None:
        """Called after each busy scheduler step."""
        if self._steps_left is None:
            return
        self._steps_left -= 1
        if self._steps_left <= 0:
            self.stop()

    def stop(self) -> str:
        """Stops profiling and writes the trace; returns its path. ValueError when none runs."""
        if self._prof is None:
            raise ValueError("no profile is running; start one first")
        prof, self._prof = self._prof, None
        prof.stop()
        path = os.path.join(self._dir, f"kvyard-scheduler-{int(time.time() * 1000)}-{os.getpid()}.trace.json")
        prof.export_chrome_trace(path)
        self.last_trace = path
        logger.info("profiling stopped; trace written to %s", path)
        return path
