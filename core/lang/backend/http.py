"""HTTP plumbing the HTTP backends share: a pooled client, failures as one-line BackendErrors
naming the URL, and server-sent events (``data: {json}`` lines up to ``data: [DONE]``)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator, Optional

import httpx

from kvyard.lang.errors import BackendError

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0


def make_client(base_url: str, api_key: Optional[str], connect_timeout: float, read_timeout: float) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
                        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))


@contextmanager
def http_errors(base_url: str, path: str):
    """Transport failures inside the block become BackendErrors."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise BackendError(f"{base_url}{path}: no reply in time ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot reach the server at {base_url}: {exc}") from None


def check_status(reply: httpx.Response, base_url: str, path: str) -> None:
    if reply.status_code >= 400:
        reply.read()
        raise BackendError(f"{base_url}{path}: HTTP {reply.status_code}: {error_message(reply.text)}")


def request_json(client: httpx.Client, base_url: str, method: str, path: str, **kw):
    with http_errors(base_url, path):
        reply = client.request(method, path, **kw)
    check_status(reply, base_url, path)
    return reply.json()


def stream_events(client: httpx.Client, base_url: str, path: str, body: dict) -> Iterator[dict]:
    """The JSON events of a streamed POST; an error event is a BackendError."""
    with http_errors(base_url, path), client.stream("POST", path, json=body) as reply:
        check_status(reply, base_url, path)
        for line in reply.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise BackendError(f"{base_url}{path}: {error_message(json.dumps(event))}")
            yield event


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
