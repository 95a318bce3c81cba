"""Backends that run the model from Python: EngineBackend (an in-process kvyard.Engine) and
Runtime (a `kvyard serve` child process, as SGLang's Runtime).

Only these import the engine (and so torch), and only when constructed; kvyard.lang itself
stays a pure client.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Optional

import httpx

from kvyard.lang.backend.native import NativeBackend
from kvyard.lang.backend.runtime_endpoint import RuntimeEndpoint
from kvyard.lang.errors import BackendError

ENGINE_FIELDS = {"text": "prompt", "input_ids": "input_ids", "sampling_params": "sampling_params",
                 "return_logprob": "return_logprob", "logprob_start_len": "logprob_start_len",
                 "top_logprobs_num": "top_logprobs_num", "return_text_in_logprobs": "return_text_in_logprobs",
                 "stream": "stream"}


class EngineTransport:
    def __init__(self, engine):
        self.engine = engine
        self.name = "Engine"

    def model_info(self) -> dict:
        tok = self.engine.tokenizer
        token = lambda name: getattr(tok, name, None) if isinstance(getattr(tok, name, None), str) else None  # noqa: E731
        template = getattr(tok, "chat_template", None)
        return {"model_path": self.engine.server_args.model_path, "is_generation": True,
                "chat_template": template if isinstance(template, str) else None,
                "bos_token": token("bos_token"), "eos_token": token("eos_token")}

    def _kwargs(self, obj: dict) -> dict:
        unknown = set(obj) - set(ENGINE_FIELDS)
        if unknown:
            raise BackendError(f"Engine: unknown request field {sorted(unknown)[0]!r}")
        return {ENGINE_FIELDS[k]: v for k, v in obj.items()}

    def generate(self, obj: dict):
        from kvyard.errors import EngineDeadError, RequestError
        try:
            return self.engine.generate(**self._kwargs(obj))
        except (RequestError, EngineDeadError) as exc:
            raise BackendError(f"Engine: {exc}") from None

    def generate_stream(self, obj: dict) -> Iterator[tuple[str, Optional[dict]]]:
        from kvyard.errors import EngineDeadError, RequestError
        meta = None
        try:
            for chunk in self.engine.generate(**self._kwargs(obj)):
                if chunk["text"]:
                    yield chunk["text"], None
                meta = chunk["meta_info"]
        except (RequestError, EngineDeadError) as exc:
            raise BackendError(f"Engine: {exc}") from None
        yield "", meta or {}


class EngineBackend(NativeBackend):
    """``EngineBackend(engine)`` serves programs from a running kvyard.Engine;
    ``EngineBackend(model_path=..., **engine_args)`` starts one and shuts it down itself."""

    def __init__(self, engine=None, chat_template=None, **engine_args: Any):
        self._owns = engine is None
        if engine is None:
            from kvyard.engine import Engine
            engine = Engine(**engine_args)
        elif engine_args:
            raise BackendError("EngineBackend: give an engine or engine arguments, not both")
        self.engine = engine
        super().__init__(EngineTransport(engine), chat_template)

    def shutdown(self) -> None:
        if self._owns:
            self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runtime(RuntimeEndpoint):
    """``Runtime(model_path=..., **server_args)``: starts `kvyard serve` on a free loopback port,
    waits until it is healthy, and is a RuntimeEndpoint to it; ``shutdown()`` stops it. Server
    arguments use the flag names with underscores (``max_total_tokens=4096``; True: a bare flag)."""

    def __init__(self, model_path: str, start_timeout: float = 600.0, api_key: Optional[str] = None,
                 chat_template=None, **server_args: Any):
        port = server_args.pop("port", None) or _free_port()
        cmd = [sys.executable, "-m", "kvyard.cli", "serve", "--model-path", model_path, "--host", "127.0.0.1",
               "--port", str(port)] + (["--api-key", api_key] if api_key else []) + _flags(server_args)
        self._log = tempfile.NamedTemporaryFile("w+", prefix="kvyard-runtime-", suffix=".log", delete=False)
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        atexit.register(self.shutdown)
        url = f"http://127.0.0.1:{port}"
        try:
            self._wait_healthy(url, start_timeout)
            super().__init__(url, api_key=api_key, chat_template=chat_template)
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"Runtime: kvyard serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise BackendError(f"Runtime: kvyard serve was not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with open(self._log.name) as f:
            return "".join(f.readlines()[-lines:])

    def shutdown(self) -> None:
        if getattr(self, "transport", None) is not None:
            self.transport.close()
        proc = getattr(self, "process", None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _flags(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (False, None):
            out += [flag, str(value)]
    return out
