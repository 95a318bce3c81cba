"""ModelRegistry: register a model class from Python, without an entry point.

    from kvyard import ModelRegistry
    ModelRegistry.register("MyForCausalLM", "my_pkg.modeling:MyForCausalLM")

Registrations are plain strings so they can be shipped to the scheduler process, which starts
from a fresh interpreter: the Engine passes ``ModelRegistry.snapshot()`` along and the scheduler
calls ``ModelRegistry.restore`` before it looks an architecture up.
"""
from __future__ import annotations

from kvyard.plugins import PluginEntry, registry


class ModelRegistry:
    _extra: dict[str, str] = {}

    @classmethod
    def register(cls, architecture: str, target: str) -> None:
        if not isinstance(target, str) or ":" not in target:
            raise ValueError("ModelRegistry.register needs a 'package.module:ClassName' string")
        cls._extra[architecture] = target

    @classmethod
    def snapshot(cls) -> dict[str, str]:
        return dict(cls._extra)

    @classmethod
    def restore(cls, entries: dict[str, str]) -> None:
        cls._extra.update(entries)

    @classmethod
    def names(cls) -> list[str]:
        return sorted(set(registry("model_architectures").names()) | set(cls._extra))

    @classmethod
    def resolve(cls, architectures: list[str]) -> type:
        """The model class for the first supported name in an HF config's `architectures`."""
        models = registry("model_architectures")
        for arch in architectures:
            if arch in cls._extra:
                return PluginEntry("model_architectures", arch, cls._extra[arch], "python", "-").load()
            if arch in models:
                return models.get(arch)
        raise ValueError(
            f"model architecture {architectures} is not supported; supported: {', '.join(cls.names())}"
        )
