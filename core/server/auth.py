"""--api-key: every endpoint but /health needs ``Authorization: Bearer KEY`` or, as Anthropic's
clients send it, ``x-api-key: KEY``.

A pure ASGI middleware (not BaseHTTPMiddleware), so streaming responses and client-disconnect
detection pass through it untouched. The key is compared in constant time.
"""
from __future__ import annotations

import hmac
import json

from kvyard.server.errors import error_body_for

OPEN_PATHS = frozenset({"/health"})


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def api_key_header(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-api-key":
            return value.decode("latin-1").strip()
    return ""


def key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        headers = scope.get("headers", []) if scope["type"] == "http" else []
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS \
                or any(key_matches(given, self.api_key) for given in (bearer_token(headers), api_key_header(headers))):
            await self.app(scope, receive, send)
            return
        message = "invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        body = json.dumps(error_body_for(scope["path"], 401, message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
