"""ImageQueue: the serving side's request queue, with one worker thread that owns the pipeline.

The HTTP event loop only submits jobs and awaits futures; all pipeline compute runs on the
worker thread (torch releases the GIL inside its kernels), so the loop never waits on it.

Batching: the worker takes the oldest waiting job, then every other waiting job with the same
``batch_key()`` (same size, steps, guidance, ...) in arrival order while the images fit in
``max_batch_size``, and runs them in one pipeline call. Jobs it skipped keep their place. When the oldest job's batch is not full and the previous call held
more than one request (requests come concurrently), the worker first waits up to
``batch_wait_s`` for more compatible jobs: clients that answer a finished batch with new requests
arrive a moment apart, and without the wait the first of them would run alone. One client at a
time never waits.
Invariants: every submitted job's future completes exactly once (result or exception); a failing
pipeline call fails only its own batch's futures and the worker keeps serving; after ``close()``
submissions are refused.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

from kvyard.diffusion.pipeline import ImageJob, StepCallback
from kvyard.errors import RequestError

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    job: ImageJob
    future: Future
    on_step: Optional[StepCallback] = None
    submitted: float = field(default_factory=time.perf_counter)


# (jobs, seconds of the pipeline call) after every call, on the worker thread
BatchHook = Callable[[list[ImageJob], float], None]


class ImageQueue:
    def __init__(self, run: Callable[[list[ImageJob], Optional[StepCallback]], list], max_batch_size: int,
                 max_queued: Optional[int] = None, on_batch: Optional[BatchHook] = None,
                 batch_wait_s: float = 0.0):
        self._run = run
        self.batch_wait_s = batch_wait_s
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.on_batch = on_batch
        self._waiting: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self._last_batch_jobs = 0
        self._thread = threading.Thread(target=self._loop, name="kvyard-diffusion", daemon=True)
        self._thread.start()

    def submit(self, job: ImageJob, on_step: Optional[StepCallback] = None) -> Future:
        """A Future of the job's outputs (a list of ``job.n``)."""
        with self._cond:
            if self._closed:
                raise RequestError("the server is shutting down", status=503)
            if self.max_queued is not None and len(self._waiting) >= self.max_queued:
                raise RequestError(f"the queue is full ({self.max_queued} requests waiting); retry later",
                                   status=429)
            entry = _Entry(job, Future(), on_step)
            self._waiting.append(entry)
            self._cond.notify()
        return entry.future

    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        for entry in list(self._waiting):
            entry.future.set_exception(RequestError("the server shut down", status=503))

    # -- the worker thread ---------------------------------------------------------------------
    def _compatible_images(self) -> int:
        key = self._waiting[0].job.batch_key()
        return sum(e.job.n for e in self._waiting if e.job.batch_key() == key)

    def _take_batch(self) -> list[_Entry]:
        """Called with the lock held and at least one job waiting."""
        first = self._waiting.popleft()
        batch, images, key = [first], first.job.n, first.job.batch_key()
        for entry in list(self._waiting):
            if entry.job.batch_key() == key and images + entry.job.n <= self.max_batch_size:
                self._waiting.remove(entry)
                batch.append(entry)
                images += entry.job.n
        return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                deadline = time.monotonic() + (self.batch_wait_s if self._last_batch_jobs > 1 else 0.0)
                while self._compatible_images() < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._take_batch()
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Entry]) -> None:
        def on_step(i: int, total: int) -> None:
            for entry in batch:
                if entry.on_step is not None:
                    try:
                        entry.on_step(i, total)
                    except Exception:  # a consumer's callback must not break the batch
                        logger.exception("progress callback failed")

        jobs = [e.job for e in batch]
        self._last_batch_jobs = len(jobs)
        start = time.perf_counter()
        try:
            outputs = self._run(jobs, on_step)
        except Exception as exc:
            logger.exception("pipeline call for %d request(s) failed", len(batch))
            for entry in batch:
                entry.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(jobs, seconds)
        for entry, out in zip(batch, outputs):
            entry.future.set_result(out)
