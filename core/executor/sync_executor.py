"""SyncExecutor: runs a batch's forward + sampling inside ``launch`` (overlap scheduling off).

The pair of OverlapWorker (core/executor/overlap_worker.py): the same ``launch(batch,
positions)`` / ``wait(step)`` / ``close()`` calls, so the Scheduler has one launch/complete path
whichever runs. Here ``launch`` returns a finished step; ``wait`` hands back its StepResult or
re-raises what the forward raised. No future tokens: every batch is completed before the next
one is scheduled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult


@dataclass
class FinishedStep:
    batch: ScheduleBatch
    result: Optional[StepResult] = None
    error: Optional[BaseException] = None
    future_start: Optional[int] = None   # no future tokens


class SyncExecutor:
    def __init__(self, runner):
        self.runner = runner

    def launch(self, batch: ScheduleBatch, positions: list[int]) -> FinishedStep:
        """positions [S]: each sampled request's sequence length (the sampling seeds' position)."""
        step = FinishedStep(batch)
        try:
            step.result = self.runner.forward(batch, positions)
        except Exception as exc:   # reported by wait(), as the overlap worker reports its errors
            step.error = exc
        return step

    def wait(self, step: FinishedStep) -> StepResult:
        if step.error is not None:
            raise step.error
        return step.result

    def close(self) -> None:
        """Nothing to stop."""
