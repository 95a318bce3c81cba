"""The example third-party plugin package installs and its attention backend is selectable."""
from __future__ import annotations

import importlib.metadata as md
import os
import random
import subprocess
import sys

import pytest

PLUGIN_DIR = os.path.join(os.path.dirname(__file__), "..", "plugins", "kvyard-example-plugin")


@pytest.fixture(scope="module")
def example_plugin_installed():
    try:
        md.distribution("kvyard-example-plugin")
    except md.PackageNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        PLUGIN_DIR], check=True)
    from kvyard.plugins import PluginManager, reset_plugin_manager
    reset_plugin_manager(PluginManager())
    yield
    reset_plugin_manager(None)


def test_listed_with_its_distribution(example_plugin_installed):
    out = subprocess.run([sys.executable, "-m", "kvyard.cli", "plugins"], capture_output=True, text=True)
    line = next(l for l in out.stdout.splitlines() if "example_dense" in l)
    assert "kvyard-example-plugin" in line and "0.2.0" in line


def test_selectable_by_name_and_correct(example_plugin_installed, tiny_models, hf_greedy):
    from kvyard import Engine

    path, hf_model = tiny_models["qwen2"]
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 256) for _ in range(n)] for n in (5, 12, 30)]
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    with Engine(model_path=path, dtype="float32", attention_backend="example_dense", skip_tokenizer_init=True,
                chunked_prefill_size=8, max_total_tokens=1024, log_level="warning") as engine:
        assert engine.get_server_info()["attention_backend"] == "example_dense"
        outs = engine.generate(input_ids=prompts, sampling_params=params)
    assert [o["output_ids"] for o in outs] == [hf_greedy(hf_model, p, 8) for p in prompts]


def test_allow_list_hides_it(example_plugin_installed):
    env = {**os.environ, "KVYARD_PLUGINS": "torch_native"}
    out = subprocess.run([sys.executable, "-m", "kvyard.cli", "plugins"], capture_output=True, text=True, env=env)
    assert "example_dense" not in out.stdout and "torch_native" in out.stdout
