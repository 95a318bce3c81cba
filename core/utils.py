"""Notebook and script helpers with SGLang's names: start a server, wait for it, stop it.

    from kvyard.utils import launch_server_cmd, wait_for_server, terminate_process
    proc, port = launch_server_cmd("kvyard serve --dtype float32 --max-total-tokens 4096")
    wait_for_server(f"http://127.0.0.1:{port}")
    ...
    terminate_process(proc)

Imports no torch (the API side of kvyard never needs it).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional


def exit_without_teardown(code: int) -> None:
    """Ends this process once its work is done and its children are stopped, skipping the
    interpreter's teardown: with torch (and a model) loaded that is ~0.5-0.8 s of finalizers for
    memory the OS takes back anyway. Log handlers and the output streams are flushed first."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_server_cmd(command: str, host: str = "127.0.0.1", port: Optional[int] = None,
                      env: Optional[dict] = None) -> tuple[subprocess.Popen, int]:
    """Starts ``command`` (e.g. "kvyard serve --model-path M") with ``--host``/``--port`` added
    (a free port when none is given), in its own process group. Returns (process, port)."""
    port = port or free_port(host)
    argv = shlex.split(command) + ["--host", host, "--port", str(port)]
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, start_new_session=True)
    return proc, port


def wait_for_server(base_url: str, timeout: Optional[float] = None, api_key: Optional[str] = None,
                    process: Optional[subprocess.Popen] = None) -> None:
    """Returns once GET /v1/models answers 200; TimeoutError after ``timeout`` seconds (None:
    wait forever); RuntimeError if ``process`` exits first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while True:
        try:
            req = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=headers)
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} did not become ready in {timeout} s")
        time.sleep(1)


def terminate_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Stops the process and everything it started (SIGTERM to its group, SIGKILL after timeout)."""
    if process.poll() is not None:
        return
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    own = group == os.getpgid(0)   # not started by launch_server_cmd: signal the process only
    kill = (lambda sig: os.kill(process.pid, sig)) if own else (lambda sig: os.killpg(group, sig))
    try:
        kill(signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(signal.SIGKILL)
        process.wait(timeout)
    except ProcessLookupError:
        pass
