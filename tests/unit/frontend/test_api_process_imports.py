"""The API process's modules import no torch: the frontend, the HTTP server and the CLI load in
a fresh interpreter without it (fast `kvyard --help`, and a frontend that never needs it by
import). What still loads torch at run time (transformers' tokenizer, xgrammar) is written up
in docs/architecture.md."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import kvyard.cli
import kvyard.server

FRONTEND = ["kvyard.frontend.launch", "kvyard.frontend.tokenizer_manager", "kvyard.frontend.outputs",
            "kvyard.frontend.detokenizer", "kvyard.engine", "kvyard.server_args", "kvyard.utils",
            "kvyard.scheduler.entry"]


def api_modules() -> list[str]:
    mods = list(FRONTEND)
    for pkg in (kvyard.server, kvyard.cli):
        mods += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if m.name != "__main__"]
    return mods


def test_api_process_modules_import_no_torch():
    mods = api_modules()
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'torch' not in sys.modules, m\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert len(mods) > 20


def test_scheduler_process_starts_before_the_api_process_imports_torch():
    """The spawn comes first, so the scheduler process loads torch and the model while the API
    process loads the tokenizer (start-up time); the launch stops at the spawn here."""
    code = ("import sys, multiprocessing.context as c\n"
            "from kvyard.frontend.launch import start_engine_process\n"
            "from kvyard.server_args import ServerArgs\n"
            "def start(self):\n"
            "    print('torch' in sys.modules, self._target.__module__)\n"
            "    raise SystemExit(0)\n"
            "c.SpawnProcess.start = start\n"
            "start_engine_process(ServerArgs())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert r.stdout.split() == ["False", "kvyard.scheduler.entry"]
