"""RuntimeEndpoint: a kvyard (or SGLang) server over HTTP, through its native /generate API.

Every failure is a BackendError naming the URL: a server that does not answer (connection
refused, or no reply within ``connect_timeout``), an HTTP error (its message from the body),
an error event in a stream.
"""
from __future__ import annotations

from typing import Iterator, Optional

from kvyard.lang.backend.http import (CONNECT_TIMEOUT_S, READ_TIMEOUT_S, make_client, request_json,
                                      stream_events)
from kvyard.lang.backend.native import NativeBackend
from kvyard.lang.errors import BackendError


class HttpTransport:
    def __init__(self, base_url: str, api_key: Optional[str] = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise BackendError(f"base_url: must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.name = f"RuntimeEndpoint({self.base_url})"
        self.client = make_client(self.base_url, api_key, connect_timeout, read_timeout)

    def _call(self, method: str, path: str, **kw):
        return request_json(self.client, self.base_url, method, path, **kw)

    def model_info(self) -> dict:
        return self._call("GET", "/get_model_info")

    def generate(self, obj: dict):
        return self._call("POST", "/generate", json=obj)

    def generate_stream(self, obj: dict) -> Iterator[tuple[str, Optional[dict]]]:
        """Deltas from the cumulative events of /generate's stream, then ("", meta)."""
        sent, meta = "", None
        for event in stream_events(self.client, self.base_url, "/generate", obj):
            text = event.get("text", "")
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent):], None
                sent = text
            meta = event.get("meta_info", meta)
        yield "", meta or {}

    def close(self) -> None:
        self.client.close()


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
