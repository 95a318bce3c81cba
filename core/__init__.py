"""kvyard: an LLM inference engine and server built as a plugin framework."""
from kvyard.version import __version__

__all__ = ["__version__", "Engine", "ModelRegistry", "ServerArgs"]

_LAZY = {"Engine": "kvyard.engine", "ModelRegistry": "kvyard.model_registry", "ServerArgs": "kvyard.server_args"}


def __getattr__(name: str):
    # Heavy modules load on first use, so `import kvyard` stays cheap for plugins.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvyard' has no attribute {name!r}")
