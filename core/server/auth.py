"""--api-key: every endpoint but /health needs ``Authorization: Bearer KEY`` or, as Anthropic's
clients send it, ``x-api-key: KEY``.
--admin-api-key: the admin endpoints (admin.ADMIN_PATHS) need that key instead, and it opens
every other endpoint too; without it the admin endpoints take --api-key like the rest.

A pure ASGI middleware (not BaseHTTPMiddleware), so streaming responses and client-disconnect
detection pass through it untouched. The key is compared in constant time.
"""
from __future__ import annotations

import hmac
from typing import Optional

from kvyard.server.limits import send_error

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
    def __init__(self, app, api_key: Optional[str], admin_api_key: Optional[str] = None):
        self.app = app
        self.api_key = api_key
        self.admin_api_key = admin_api_key

    def _allowed(self, path: str, token: str) -> bool:
        from kvyard.server.admin import ADMIN_PATHS

        if path in OPEN_PATHS:
            return True
        if self.admin_api_key and key_matches(token, self.admin_api_key):
            return True
        if path in ADMIN_PATHS and self.admin_api_key:
            return False
        return self.api_key is None or key_matches(token, self.api_key)

    async def __call__(self, scope, receive, send):
        headers = scope.get("headers", []) if scope["type"] == "http" else []
        if scope["type"] != "http" or any(self._allowed(scope["path"], given)
                                          for given in (bearer_token(headers), api_key_header(headers))):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                         headers=[(b"www-authenticate", b"Bearer")], path=scope["path"])
