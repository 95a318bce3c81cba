"""Fixtures of the integration layer: a real `kvyard serve` on a loopback port.

``kvyard_server`` is started once per session (the first test that needs it pays the start-up)
with SmolLM2-135M-Instruct in float32 and every optional feature the tests exercise switched on
(API key, metrics, cache report, a small context length for the 413 case).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest

from kvyard.utils import free_port

API_KEY = "test-key-123"
SERVED_NAME = "smollm2"
READY_PREFIX = "kvyard server ready at "
START_TIMEOUT_S = 600


@dataclass
class ServerProcess:
    """A `kvyard serve` child process; its output is collected in ``lines`` by a reader thread."""
    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX):].strip()
                self.ready.set()
        self.ready.set()  # exited: wake the waiter

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(args: list[str], timeout: float = START_TIMEOUT_S, python: str = sys.executable,
                 env: dict | None = None) -> ServerProcess:
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([python, "-m", "kvyard.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    server = ServerProcess(proc)
    threading.Thread(target=server._read, daemon=True).start()
    server.ready.wait(timeout)
    if not server.url:
        server.stop()
        raise RuntimeError(f"kvyard serve did not become ready:\n{server.output()}")
    return server


@pytest.fixture(scope="session")
def kvyard_server(smollm2_path, tmp_path_factory):
    storage = tmp_path_factory.mktemp("kvyard_files")
    server = start_server([
        "--model-path", smollm2_path, "--dtype", "float32", "--max-total-tokens", "8192",
        "--context-length", "2048", "--port", str(free_port()), "--api-key", API_KEY,
        "--served-model-name", SERVED_NAME, "--enable-metrics", "--enable-cache-report",
        "--file-storage-path", str(storage), "--num-threads", "2", "--log-level", "warning"])
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="session")
def base_url(kvyard_server) -> str:
    return kvyard_server.url


@pytest.fixture(scope="session")
def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def client(base_url):
    """The official openai SDK pointed at the server."""
    from openai import OpenAI
    return OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


ADMIN_KEY = "admin-key-456"
# the limits server: small limits so each one is cheap to reach, a KV pool (200 tokens) smaller
# than the context (256), request templates trusted, an admin key beside the API key
LIMITS = {"max_n": 4, "max_sequences_per_request": 8, "max_request_body_mb": 1, "http_header_timeout": 1,
          "preprocess_timeout": 3, "max_total_tokens": 200, "context_length": 256}


@pytest.fixture(scope="session")
def limits_server(smollm2_path, tmp_path_factory):
    storage = tmp_path_factory.mktemp("kvyard_limits_files")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    server = start_server([
        "--model-path", smollm2_path, "--dtype", "float32", *flags, "--port", str(free_port()),
        "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY, "--trust-request-chat-template",
        "--file-storage-path", str(storage), "--num-threads", "1", "--log-level", "warning"])
    yield server
    assert server.stop() == 0, server.output()


def assert_documented(spec: dict, method: str, path: str, response) -> None:
    """``response`` (a requests.Response of ``method`` on the route ``path``, as /openapi.json
    spells it) has a documented status and a JSON body valid for that status's schema."""
    import jsonschema

    responses = spec["paths"][path][method.lower()]["responses"]
    documented = responses.get(str(response.status_code)) or responses["default"]
    schema = documented["content"]["application/json"]["schema"]
    # the schema's $refs point into the spec's components: validate with them beside it
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(response.json())
