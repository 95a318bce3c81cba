"""The plugin registry: discovery, allow-list, lazy factories, errors, ModelRegistry."""
from __future__ import annotations

import argparse
import subprocess
import sys
import types

import pytest

from kvyard.hookspecs import hookimpl
from kvyard.plugins import KINDS, PluginError, PluginManager


def test_builtins_are_registered_through_entry_points():
    pm = PluginManager()
    names = {(e.kind, e.name): e for e in pm.all_entries()}
    assert ("attention_backends", "torch_native") in names
    assert ("model_architectures", "LlamaForCausalLM") in names
    assert ("load_formats", "gguf") in names
    assert names[("attention_backends", "torch_native")].distribution == "kvyard"


def test_autoload_off_and_manual_plugin():
    pm = PluginManager(autoload=False)
    assert pm.all_entries() == []
    plugin = types.ModuleType("my_plugin")

    @hookimpl
    def register_attention_backends(register):
        register("mine", "collections:OrderedDict")

    plugin.register_attention_backends = register_attention_backends
    pm.add_plugin(plugin, distribution=("my-dist", "1.2"))
    entry = pm.registry("attention_backends").entry("mine")
    assert (entry.distribution, entry.version) == ("my-dist", "1.2")
    import collections
    assert entry.load() is collections.OrderedDict  # the lazy string resolves on load


def test_allow_list_limits_entry_points():
    pm = PluginManager(allow=["torch_native"])
    assert pm.registry("attention_backends").names() == ["torch_native"]
    assert pm.registry("model_architectures").names() == []


def test_unknown_name_lists_valid_ones():
    pm = PluginManager()
    with pytest.raises(PluginError, match="unknown attention backend 'nope'; valid: .*torch_native"):
        pm.registry("attention_backends").get("nope")


def test_selected_plugin_that_fails_to_import_is_loud():
    pm = PluginManager(autoload=False)
    plugin = types.ModuleType("broken_plugin")

    @hookimpl
    def register_attention_backends(register):
        register("broken", "kvyard_no_such_module:Backend")

    plugin.register_attention_backends = register_attention_backends
    pm.add_plugin(plugin)
    with pytest.raises(PluginError, match="attention_backends plugin 'broken' .* failed to load"):
        pm.registry("attention_backends").get("broken")


def test_discovered_broken_plugin_only_warns(monkeypatch, caplog):
    import importlib.metadata as md

    class FakeEP:
        name, group = "ghost", "kvyard"
        dist = types.SimpleNamespace(name="ghost-dist", version="0.0.1")

        def load(self):
            raise ImportError("no module named ghost")

    real = md.entry_points
    monkeypatch.setattr(md, "entry_points", lambda group: list(real(group=group)) + [FakeEP()])
    pm = PluginManager()
    assert any("ghost-dist" in m for m in pm.broken)
    assert "torch_native" in pm.registry("attention_backends")  # startup went on


def test_cli_rejects_unknown_plugin_name_at_parse_time():
    from kvyard.server_args import ServerArgs

    parser = argparse.ArgumentParser(exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    with pytest.raises(argparse.ArgumentError, match="valid: .*torch_native"):
        parser.parse_args(["--attention-backend", "nope"])
    with pytest.raises(ValueError, match="attention_backend: unknown attention backend 'nope'"):
        ServerArgs(attention_backend="nope")


def test_kinds_are_complete():
    assert set(KINDS) >= {"attention_backends", "quantization_methods", "model_architectures", "load_formats",
                          "tool_call_parsers", "reasoning_parsers", "grammar_backends"}


def test_model_registry_register_and_snapshot():
    from kvyard.model_registry import ModelRegistry

    ModelRegistry.register("MyTestForCausalLM", "collections:OrderedDict")
    try:
        import collections
        assert ModelRegistry.resolve(["MyTestForCausalLM"]) is collections.OrderedDict
        assert ModelRegistry.snapshot()["MyTestForCausalLM"] == "collections:OrderedDict"
        with pytest.raises(ValueError, match="not supported; supported: .*LlamaForCausalLM"):
            ModelRegistry.resolve(["UnknownArch"])
        with pytest.raises(ValueError, match="package.module:ClassName"):
            ModelRegistry.register("X", object)
    finally:
        ModelRegistry._extra.pop("MyTestForCausalLM", None)


def test_plugins_command_lists_distribution_and_version():
    out = subprocess.run([sys.executable, "-m", "kvyard.cli", "plugins"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch_native" in out.stdout and "kvyard" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kvyard.cli", "version"], capture_output=True, text=True)
    assert out.stdout.startswith("kvyard ")


def test_generate_rejects_unknown_backend_with_one_line():
    out = subprocess.run([sys.executable, "-m", "kvyard.cli", "generate", "--prompt", "x",
                          "--attention-backend", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "valid:" in lines[0] and "torch_native" in lines[0]
