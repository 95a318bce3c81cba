"""Plugin discovery and the per-kind registries.

One mechanism: pluggy with entry-point group "kvyard". Built-in plugins are registered through
the same entry points as third-party ones (see pyproject.toml).

Environment:
  KVYARD_PLUGINS            comma-separated allow-list of entry-point names (unset: all).
  KVYARD_DISABLE_AUTOLOAD   "1" skips entry-point autoload (tests register plugins by hand).
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import pluggy

from kvyard import hookspecs
from kvyard.hookspecs import PROJECT, Factory

logger = logging.getLogger(__name__)

KINDS = (
    "attention_backends",
    "quantization_methods",
    "model_architectures",
    "load_formats",
    "tool_call_parsers",
    "reasoning_parsers",
    "grammar_backends",
    "speculative_algorithms",
    "diffusion_pipelines",
    "logit_processors",
)


class PluginError(RuntimeError):
    """A plugin the user selected is unknown or failed to load."""


@dataclass(frozen=True)
class PluginEntry:
    kind: str
    name: str
    factory: Factory
    distribution: str
    version: str

    def load(self) -> Callable[..., object]:
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr) if attr else module
        except Exception as exc:  # a selected plugin that fails to import is a loud error
            raise PluginError(
                f"{self.kind} plugin {self.name!r} from {self.distribution} failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


class Registry:
    """Named factories of one kind, filled by the plugins' register_<kind> hooks."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, PluginEntry] = {}

    def add(self, entry: PluginEntry) -> None:
        if entry.name in self._entries and self._entries[entry.name].factory != entry.factory:
            logger.warning("%s %r from %s overrides the one from %s", self.kind, entry.name,
                           entry.distribution, self._entries[entry.name].distribution)
        self._entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[PluginEntry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> PluginEntry:
        if name not in self._entries:
            raise PluginError(self.unknown_message(name))
        return self._entries[name]

    def get(self, name: str) -> Callable[..., object]:
        return self.entry(name).load()

    def unknown_message(self, name: str) -> str:
        label = self.kind[:-1].replace("_", " ")
        return f"unknown {label} {name!r}; valid: {', '.join(self.names()) or '(none installed)'}"


def _distribution_of(plugin: object, dist_by_module: dict[str, tuple[str, str]]) -> tuple[str, str]:
    module = getattr(plugin, "__name__", "") or type(plugin).__module__
    top = module.split(".")[0]
    return dist_by_module.get(module) or dist_by_module.get(top) or ("python", "-")


class PluginManager:
    """Loads the "kvyard" entry points once and builds one Registry per kind."""

    def __init__(self, autoload: bool | None = None, allow: Iterable[str] | None = None):
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._dists: dict[str, tuple[str, str]] = {}
        self.broken: list[str] = []
        if autoload is None:
            autoload = os.environ.get("KVYARD_DISABLE_AUTOLOAD", "") not in ("1", "true")
        if allow is None and os.environ.get("KVYARD_PLUGINS"):
            allow = [n.strip() for n in os.environ["KVYARD_PLUGINS"].split(",") if n.strip()]
        if autoload:
            self._load_entry_points(set(allow) if allow is not None else None)
        self._registries: dict[str, Registry] | None = None

    def _load_entry_points(self, allow: set[str] | None) -> None:
        for ep in md.entry_points(group=PROJECT):
            if allow is not None and ep.name not in allow:
                continue
            dist = ep.dist.name if ep.dist else "unknown"
            version = ep.dist.version if ep.dist else "-"
            try:
                plugin = ep.load()
            except Exception as exc:  # a discovered broken plugin only warns
                msg = f"plugin {ep.name!r} from distribution {dist} failed to import: {exc}"
                logger.warning(msg)
                self.broken.append(msg)
                continue
            self.add_plugin(plugin, name=ep.name, distribution=(dist, version))

    def add_plugin(self, plugin: object, name: str | None = None,
                   distribution: tuple[str, str] = ("python", "-")) -> None:
        """Registers a plugin object or module by hand (tests, embedding applications)."""
        if self.pm.is_registered(plugin):
            return
        self.pm.register(plugin, name=name)
        self._dists[getattr(plugin, "__name__", name or repr(plugin))] = distribution
        self._registries = None

    def registry(self, kind: str) -> Registry:
        if kind not in KINDS:
            raise KeyError(f"unknown plugin kind {kind!r}; valid: {', '.join(KINDS)}")
        if self._registries is None:
            self._registries = self._collect()
        return self._registries[kind]

    def _collect(self) -> dict[str, Registry]:
        registries = {kind: Registry(kind) for kind in KINDS}
        for kind in KINDS:
            hook = getattr(self.pm.hook, f"register_{kind}")
            for impl in hook.get_hookimpls():
                dist, version = _distribution_of(impl.plugin, self._dists)

                def register(name: str, factory: Factory, _k=kind, _d=dist, _v=version) -> None:
                    registries[_k].add(PluginEntry(_k, name, factory, _d, _v))

                try:
                    impl.function(register=register)
                except Exception as exc:
                    msg = f"plugin {impl.plugin_name!r} ({dist}) failed in register_{kind}: {exc}"
                    logger.warning(msg)
                    self.broken.append(msg)
        return registries

    def all_entries(self) -> list[PluginEntry]:
        return [e for kind in KINDS for e in self.registry(kind).entries()]


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, created on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager(manager: PluginManager | None = None) -> None:
    global _manager
    _manager = manager


def registry(kind: str) -> Registry:
    return get_plugin_manager().registry(kind)
