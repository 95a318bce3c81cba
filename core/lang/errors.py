"""Errors of the frontend language. Each message is one line that names the field or the
backend at fault, so a broken program fails with a reason, never a hang or a bare traceback."""
from __future__ import annotations


class LangError(Exception):
    """A program or a call into kvyard.lang is malformed (bad argument, name used twice, ...)."""


class NotSupportedError(LangError):
    """The feature exists in SGLang's language but this backend or model cannot serve it."""


class BackendError(LangError):
    """The backend failed: unreachable, an HTTP error body, or a reply without what was asked."""
