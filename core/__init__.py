"""kvyard: an LLM inference engine and server built as a plugin framework."""
import os as _os

from kvyard.version import __version__

# OpenMP threads that wait for each other by spinning without end (OMP_WAIT_POLICY=ACTIVE) collapse
# a CPU step when another process shares the cores: 1,888 vs 32 ms per batch-1 decode step with
# two threads on a busy 2-core machine. Waiters that sleep at once (PASSIVE, no spin) pay a wake-up
# at each of the ~120 parallel regions of a decode step: 17 vs 5 ms per step on a quiet machine.
# So waiters spin briefly, then sleep: GOMP_SPINCOUNT 3,000 (figures in docs/performance.md).
# libgomp reads both once, when torch loads it, so they are set here, before anything imports
# torch (the scheduler processes inherit them); values the user set win, and a user's own
# OMP_WAIT_POLICY keeps libgomp's spin count for that policy.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000")

__all__ = ["__version__", "Engine", "ModelRegistry", "ServerArgs"]

_LAZY = {"Engine": "kvyard.engine", "ModelRegistry": "kvyard.model_registry", "ServerArgs": "kvyard.server_args"}


def __getattr__(name: str):
    # Heavy modules load on first use, so `import kvyard` stays cheap for plugins.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvyard' has no attribute {name!r}")
