"""The README's install command in a fresh virtual environment (the same line .ci/run uses),
then a server from that environment with its default flags answers a json_schema request with
valid JSON: everything the defaults need is installed by default."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import requests

from conftest import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def readme_install_line() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Install"))
    return lines[start + 1].strip()


@pytest.mark.slow
def test_readme_install_gives_a_server_whose_defaults_work(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv))
    install = subprocess.run(["bash", "-c", readme_install_line()], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=3600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    server = start_server(["--dtype", "float32", "--max-total-tokens", "4096", "--port", str(free_port()),
                           "--num-threads", "1"], python=str(venv / "bin" / "python"), env=env)
    try:
        r = requests.post(server.url + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": "Describe a person as JSON."}], "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
    finally:
        assert server.stop() == 0, server.output()
