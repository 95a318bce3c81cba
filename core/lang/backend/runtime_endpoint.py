"""RuntimeEndpoint: a kvyard (or SGLang) server over HTTP, through its native /generate API.

Every failure is a BackendError naming the URL: a server that does not answer (connection
refused, or no reply within ``connect_timeout``), an HTTP error (its message from the body),
an error event in a stream.
"""
from __future__ import annotations

import json
from typing import Iterator, Optional

import httpx

from kvyard.lang.backend.native import NativeBackend
from kvyard.lang.errors import BackendError

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0


class HttpTransport:
    def __init__(self, base_url: str, api_key: Optional[str] = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise BackendError(f"base_url: must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.name = f"RuntimeEndpoint({self.base_url})"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    def _call(self, method: str, path: str, **kw):
        try:
            reply = self.client.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise BackendError(f"{self.base_url}{path}: no reply in time ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the server at {self.base_url}: {exc}") from None
        if reply.status_code >= 400:
            raise BackendError(f"{self.base_url}{path}: HTTP {reply.status_code}: {error_message(reply.text)}")
        return reply.json()

    def model_info(self) -> dict:
        return self._call("GET", "/get_model_info")

    def generate(self, obj: dict):
        return self._call("POST", "/generate", json=obj)

    def generate_stream(self, obj: dict) -> Iterator[tuple[str, Optional[dict]]]:
        """Deltas from the cumulative events of /generate's stream, then ("", meta)."""
        sent = ""
        meta = None
        try:
            with self.client.stream("POST", "/generate", json=obj) as reply:
                if reply.status_code >= 400:
                    reply.read()
                    raise BackendError(f"{self.base_url}/generate: HTTP {reply.status_code}: "
                                       f"{error_message(reply.text)}")
                for line in reply.iter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise BackendError(f"{self.base_url}/generate: {error_message(json.dumps(event))}")
                    text = event.get("text", "")
                    if text[:len(sent)] == sent and len(text) > len(sent):
                        yield text[len(sent):], None
                        sent = text
                    meta = event.get("meta_info", meta)
        except httpx.TimeoutException as exc:
            raise BackendError(f"{self.base_url}/generate: no reply in time ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the server at {self.base_url}: {exc}") from None
        yield "", meta or {}

    def close(self) -> None:
        self.client.close()


def error_message(body: str) -> str:
    """The message of an OpenAI/kvyard error body, else the body itself (cut short)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return body[:300]


class RuntimeEndpoint(NativeBackend):
    """``RuntimeEndpoint("http://127.0.0.1:30000", api_key=...)``: asks the server for its model
    info (and chat template) at once, so an unreachable server fails here."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, chat_template=None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S):
        self.base_url = base_url
        self.api_key = api_key
        super().__init__(HttpTransport(base_url, api_key, connect_timeout, read_timeout), chat_template)

    def get_model_name(self) -> str:
        return self.model_info.get("model_path", "")

    def flush_cache(self) -> None:
        self.transport._call("POST", "/flush_cache")

    def shutdown(self) -> None:
        self.transport.close()
