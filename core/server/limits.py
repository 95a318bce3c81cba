"""HTTP-layer limits: what a request may cost the server before any handler runs.

- ``RequestBodyGuard`` (ASGI middleware), for every route, before the app sees the request:
  a body above --max-request-body-mb is a 413, from its Content-Length before anything is read,
  or as soon as the bytes received pass the limit (chunked bodies); a JSON body is then parsed
  once by pydantic-core's strict parser, which refuses what Python's ``json`` lets through: NaN
  and Infinity, lone surrogates, invalid UTF-8, and nesting deeper than a few hundred levels (a
  RecursionError for ``json``). Each is a 400 with the parser's message. A body that passes is
  replayed to the app unchanged, so any handler's own parsing sees only strict JSON.
- ``header_timeout_protocol`` (--http-header-timeout): uvicorn's h11 protocol with a deadline on
  a request's head. uvicorn only times out idle keep-alive connections after a response; a
  client that opens a connection and sends its headers slowly held a socket forever.
"""
from __future__ import annotations

import json
from typing import Any, Optional

MIB = 1 << 20
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RequestBodyGuard:
    """Pure ASGI middleware: the whole body is read (up to the limit) and checked, then replayed;
    later ``receive`` calls go to the client again (disconnect detection keeps working)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers, path = scope.get("headers", []), scope["path"]   # path: whose error body shape
        declared = _header(headers, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, self._too_large(), path=path)
            return
        body, disconnected = await self._read(receive)
        if body is None:
            await send_error(send, 413, self._too_large(), path=path)
            return
        if not disconnected and _is_json(headers) and body.strip():
            problem = strict_json_problem(body)
            if problem:
                field = non_finite_field(body)
                if field is not None:
                    await send_error(send, 400, f"{field}: must be a finite number (NaN and Infinity are not JSON)",
                                     param=field, path=path)
                else:
                    await send_error(send, 400, f"the request body is not valid JSON: {problem}", path=path)
                return
        await self.app(scope, _replay(body, disconnected, receive), send)

    def _too_large(self) -> str:
        return (f"the request body is larger than the server's limit of {self.max_bytes / MIB:g} MiB "
                "(--max-request-body-mb)")

    async def _read(self, receive) -> tuple[Optional[bytes], bool]:
        """(body, client gone); body None when it passed the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _replay(body: bytes, disconnected: bool, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()
    return replay


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> Optional[str]:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """FastAPI reads a body as JSON when it says so, or says nothing."""
    content_type = (_header(headers, b"content-type") or "").split(";")[0].strip().lower()
    return not content_type or content_type == "application/json" or content_type.endswith("+json")


def strict_json_problem(raw: bytes) -> Optional[str]:
    """None when ``raw`` is strict JSON, else the parser's one-line message."""
    from pydantic_core import from_json

    try:
        from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        return str(exc)
    return None


class _NonFinite(float):
    """Python's json reading NaN / Infinity / -Infinity, marked so the field can be found."""


def non_finite_field(raw: bytes) -> Optional[str]:
    """The dotted path of the first NaN or Infinity in a body that is JSON but for them, else None."""
    try:
        value = json.loads(raw, parse_constant=lambda text: _NonFinite(text.replace("Infinity", "inf")))
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, _NonFinite):
            return path or None
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend(reversed([(f"{path}.{k}" if path else str(k), v) for k, v in children]))
    return None


async def send_error(send, status: int, message: str, param: Optional[str] = None,
                     headers: Optional[list[tuple[bytes, bytes]]] = None, path: str = "") -> None:
    """The error body of the API ``path`` belongs to (OpenAI's, or Anthropic's under /v1/messages)
    straight from an ASGI middleware (before the app)."""
    from kvyard.server.errors import error_body_for

    body = json.dumps(error_body_for(path, status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# -- slow headers --------------------------------------------------------------------------
def header_timeout_protocol(timeout_s: float):
    """uvicorn's H11Protocol, closing a connection whose request head takes over ``timeout_s``.

    The deadline runs while the connection waits for a request head: from the connection's
    start, and again whenever bytes of a next request arrive on a kept-alive connection. It is
    cancelled once h11 has parsed the head (the body is the handler's business)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                if self._header_timer is None:
                    self._arm_header_timer()
            else:
                self._disarm_header_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._header_timeout)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol
