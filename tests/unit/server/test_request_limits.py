"""The hardening mechanisms one by one, without a server: request-size limits, the preprocessing
budget, non-finite sampling values, weight-path confinement, the exposure warning, the grammar
backend probe, IPC folder clean-up, --help's KV default and the README's install line."""
from __future__ import annotations

import asyncio
import builtins
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvyard.errors import RequestError
from kvyard.frontend.limits import RequestLimits, check_request_size
from kvyard.sampling.params import SamplingParams

ROOT = Path(__file__).resolve().parents[3]


# -- n and sequences ---------------------------------------------------------------------------
@pytest.mark.parametrize("obj, field, words", [
    ({"text": "a", "sampling_params": {"n": 10**9}}, "n", "--max-n"),
    ({"text": ["a"] * 5, "sampling_params": {"n": 2}}, "n", "--max-sequences-per-request"),
    ({"text": ["a", "b"], "sampling_params": [{"n": 4}, {"n": 5}]}, "n", "--max-n"),
    ({"input_ids": [[1]] * 9}, "n", "--max-sequences-per-request"),
    ({"text": "a", "top_logprobs_num": 21}, "top_logprobs_num", "--max-top-logprobs-num"),
])
def test_request_size_limits(obj, field, words):
    limits = RequestLimits(max_n=4, max_sequences_per_request=8, max_top_logprobs_num=20)
    with pytest.raises(RequestError) as info:
        check_request_size(obj, limits)
    assert info.value.param == field and words in info.value.message


def test_within_limits_and_no_limits_pass():
    limits = RequestLimits(max_n=4, max_sequences_per_request=8)
    check_request_size({"text": ["a", "b"], "sampling_params": {"n": 4}}, limits)
    check_request_size({"text": "a", "sampling_params": SamplingParams(n=3)}, limits)
    check_request_size({"text": "a", "sampling_params": {"n": 10**9}}, None)   # the offline Engine


# -- preprocessing budget ----------------------------------------------------------------------
def test_a_runaway_preprocessing_job_is_interrupted_at_its_budget():
    from kvyard.server.offload import run_off_loop

    progress = []

    def spin():
        while True:
            progress.append(1)
            progress.clear()

    async def main():
        loop_ticks = 0

        async def ticker():
            nonlocal loop_ticks
            while True:
                await asyncio.sleep(0.01)
                loop_ticks += 1
        tick = asyncio.ensure_future(ticker())
        with pytest.raises(RequestError, match="--preprocess-timeout") as info:
            await run_off_loop(spin, 0.5, param="messages")
        tick.cancel()
        assert info.value.param == "messages"
        assert loop_ticks > 5                      # the loop kept running meanwhile
        assert await run_off_loop(lambda: 42, 5) == 42

    asyncio.run(main())
    time.sleep(0.2)
    import threading
    assert not [t for t in threading.enumerate() if t.name == "kvyard-preprocess"]   # the spinner stopped


# -- floats ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 1e30),
    ("top_p", float("nan")), ("min_p", float("inf")), ("frequency_penalty", float("nan")),
    ("presence_penalty", float("-inf")), ("repetition_penalty", float("inf")),
])
def test_non_finite_and_absurd_sampling_values_name_the_field(field, value):
    """A non-finite value is refused as such (not as out of range: NaN is in no range, and an
    infinity must not reach a range check that lets it through, as temperature's once did)."""
    problem = "a finite number" if not math.isfinite(value) else "in"
    with pytest.raises(ValueError, match=f"^{field} must be {problem}"):
        SamplingParams.from_dict({field: value}).verify(100)


@pytest.mark.parametrize("bias", [float("nan"), float("inf"), 1e30, -101.0])
def test_logit_bias_values_are_bounded(bias):
    with pytest.raises(ValueError, match="^logit_bias value"):
        SamplingParams.from_dict({"logit_bias": {"5": bias}}).verify(100)
    SamplingParams.from_dict({"logit_bias": {"5": -100.0}}).verify(100)


# -- admin ---------------------------------------------------------------------------------------
def test_weight_paths_are_confined(tmp_path):
    from kvyard.server.admin import allowed_weight_dirs, check_weight_update

    model = tmp_path / "models" / "m.gguf"
    model.parent.mkdir()
    model.write_bytes(b"x")
    sibling = tmp_path / "models" / "other"
    sibling.mkdir()
    outside = tmp_path.parent / "elsewhere"
    args = SimpleNamespace(weight_update_dirs=None)
    assert allowed_weight_dirs(args, str(model)) == [str(model.parent), str(tmp_path)]
    assert check_weight_update(args, str(model), str(sibling), None) == str(sibling)
    assert check_weight_update(args, str(model), str(sibling / ".." / ".." / ".." / "etc"), None) is None
    assert check_weight_update(args, str(model), str(outside), None) is None
    link = tmp_path / "models" / "link"
    link.symlink_to("/etc")
    assert check_weight_update(args, str(model), str(link), None) is None     # symlinks are followed
    only = SimpleNamespace(weight_update_dirs=[str(sibling)])
    assert check_weight_update(only, str(model), str(model), None) is None
    with pytest.raises(RequestError) as info:
        check_weight_update(args, str(model), str(sibling), "dummy")
    assert info.value.param == "load_format"


def test_exposed_server_without_a_key_is_warned_about():
    from kvyard.server.admin import warn_if_exposed

    def args(host, key=None, admin=None):
        return SimpleNamespace(host=host, api_key=key, admin_api_key=admin)
    assert "0.0.0.0" in warn_if_exposed(args("0.0.0.0"))
    assert warn_if_exposed(args("::")) is not None
    for quiet in (args("127.0.0.1"), args("localhost"), args("::1"), args("0.0.0.0", key="k"),
                  args("0.0.0.0", admin="a")):
        assert warn_if_exposed(quiet) is None


# -- grammar backend ---------------------------------------------------------------------------
def test_a_grammar_backend_that_cannot_load_is_reported_and_answers_501(monkeypatch):
    from kvyard.grammar.manager import make_grammar_checker

    real_import = builtins.__import__

    def no_xgrammar(name, *args, **kwargs):
        if name.split(".")[0] == "xgrammar":
            raise ModuleNotFoundError("No module named 'xgrammar'", name="xgrammar")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_xgrammar)
    checker = make_grammar_checker("xgrammar", 1000, None, has_tokenizer=True)
    assert checker.load_error and "pip install xgrammar" in checker.load_error
    with pytest.raises(RequestError) as info:
        checker.check(SamplingParams(json_schema='{"type": "object"}'))
    assert info.value.status == 501 and info.value.param == "json_schema"
    assert "pip install xgrammar" in info.value.message


def test_the_default_grammar_backend_is_a_default_dependency():
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert re.search(r'^\s*"xgrammar', deps, re.M), "the default --grammar-backend must install by default"


# -- IPC folders ---------------------------------------------------------------------------------
def test_stale_ipc_folders_of_dead_api_processes_are_removed(tmp_path, monkeypatch):
    import tempfile

    from kvyard.scheduler import parent_watch

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"kvyard-{dead.pid}-abc"
    live = tmp_path / f"kvyard-{os.getpid()}-def"
    other = tmp_path / "kvyard-notapid"
    for d in (stale, live, other):
        d.mkdir()
    fresh = parent_watch.make_ipc_dir()
    assert not stale.exists() and live.exists() and other.exists()
    assert os.path.basename(fresh).startswith(f"kvyard-{os.getpid()}-")
    parent_watch.remove_ipc_dir(fresh)
    assert not os.path.exists(fresh)


# -- docs and flags ------------------------------------------------------------------------------
def readme_install_line() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Install"))
    return lines[start + 1].strip()


def test_ci_installs_with_the_readme_command():
    line = readme_install_line()
    assert line.startswith("pip install") and "-e " in line
    assert line in [raw.strip() for raw in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_docs_list_every_limit_flag():
    """Every flag of the "request limits" group, and the other flags that bound what one request
    or client may cost, has a row in docs/api.md's Limits section."""
    from dataclasses import fields

    from kvyard.server_args import ServerArgs

    api = (ROOT / "docs" / "api.md").read_text()
    limits = api[api.index("## Limits"):]
    limits = limits[:limits.index("\n## ", 1)]
    flags = ["--" + f.name.replace("_", "-") for f in fields(ServerArgs) if f.metadata.get("group") == "limits"]
    assert len(flags) >= 7, flags
    others = ("--max-total-tokens", "--context-length", "--max-queued-requests", "--max-running-requests",
              "--watchdog-timeout", "--weight-update-dirs", "--admin-api-key", "--api-key")
    for flag in (*flags, *others):
        assert f"`{flag}" in limits, flag
