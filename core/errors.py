"""Errors a caller can act on. The HTTP layer turns them into OpenAI-style error bodies."""
from __future__ import annotations

from typing import Optional


class RequestError(ValueError):
    """A bad request: one line naming the field (``param``); ``status`` is the HTTP code."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


class EngineDeadError(RuntimeError):
    """The scheduler process is gone; pending requests fail with this."""
