"""JSON bodies whatever their Content-Type, as SGLang accepts them: a plain ``curl -d '{...}'``
sends ``application/x-www-form-urlencoded``, which no kvyard endpoint takes. Such a request (or
one without a Content-Type) is handed on as ``application/json``; multipart uploads (/v1/files)
and explicit JSON are untouched."""
from __future__ import annotations

REWRITTEN = (b"", b"application/x-www-form-urlencoded", b"text/plain")


class JsonBodyMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if ctype.split(b";")[0].strip().lower() in REWRITTEN:
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
