"""kvyard: an LLM inference engine and server built as a plugin framework."""
import os as _os

from kvyard.version import __version__

# OpenMP threads that wait for each other by spinning (libgomp's default) collapse a CPU step when
# another process shares the cores: measured 1,888 vs 32 ms per batch-1 decode step with two
# threads on a busy 2-core machine (docs/performance.md). Passive waiters sleep instead. libgomp
# reads this once, when torch loads it, so it is set here, before anything imports torch (and the
# scheduler processes inherit it); a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["__version__", "Engine", "ModelRegistry", "ServerArgs"]

_LAZY = {"Engine": "kvyard.engine", "ModelRegistry": "kvyard.model_registry", "ServerArgs": "kvyard.server_args"}


def __getattr__(name: str):
    # Heavy modules load on first use, so `import kvyard` stays cheap for plugins.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvyard' has no attribute {name!r}")
