"""The scheduler process's spawn target, importable without torch.

The API process names this function when it starts the scheduler process; importing
kvyard.scheduler.process there would pull in torch (~1 s) before the new process even starts, while
the new process imports it anyway. Here the heavy import happens in the scheduler process only.
"""
from __future__ import annotations


def run_scheduler_process(*args, **kwargs) -> None:
    from kvyard.scheduler.process import run_scheduler_process as run

    run(*args, **kwargs)
