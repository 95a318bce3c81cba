"""Boundary scanning for text that may still be growing (a model's partial output).

These helpers find where a marker or a JSON value ends without decoding anything; the caller
json.loads a slice once it is complete. Two outcomes besides a position:
  PENDING  the text ends first: more output could still complete it;
  MISMATCH (literals) / JsonScanError (JSON): no continuation can make it match.
"""
from __future__ import annotations

import re
from typing import Iterable

PENDING = None
MISMATCH = -1

_WS = re.compile(r"\s*")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\[\s\S])*"')
# A whole string (skipped), a bracket, or a lone quote (an unterminated string).
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\[\s\S])*"|[{}\[\]"]')
# Numbers and true/false/null; json.loads checks the spelling once the value is complete.
_JSON_SCALAR = re.compile(r"[-+0-9.eEa-zA-Z]+")
_CLOSER = {"{": "}", "[": "]"}


class JsonScanError(ValueError):
    """The text cannot be the beginning of the JSON value expected here."""


def skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def match_literal(text: str, pos: int, literal: str) -> int | None:
    """End of ``literal`` at ``pos``; PENDING if the text ends inside it; MISMATCH otherwise."""
    if text.startswith(literal, pos):
        return pos + len(literal)
    if literal.startswith(text[pos:]):
        return PENDING
    return MISMATCH


def held_suffix(text: str, start: int, markers: Iterable[str]) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of some marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text) - start), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def find_first(text: str, pos: int, markers: Iterable[str]) -> tuple[int, str] | None:
    """(index, marker) of the earliest marker occurrence in text[pos:]."""
    best = None
    for marker in markers:
        idx = text.find(marker, pos)
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, marker)
    return best


def scan_json_string(text: str, pos: int) -> int | None:
    """End of the JSON string starting at text[pos] == '"'; PENDING if unterminated."""
    m = _JSON_STRING.match(text, pos)
    return m.end() if m else PENDING


def scan_json_value(text: str, pos: int) -> int | None:
    """End of the JSON value starting at text[pos]; PENDING if the text ends first.

    A scalar touching the end of the text is PENDING too (``12`` may become ``123``).
    """
    if pos >= len(text):
        return PENDING
    first = text[pos]
    if first == '"':
        return scan_json_string(text, pos)
    if first in _CLOSER:
        return _scan_container(text, pos)
    m = _JSON_SCALAR.match(text, pos)
    if m is None:
        raise JsonScanError(f"unexpected {first!r} at {pos}")
    return m.end() if m.end() < len(text) else PENDING


def _scan_container(text: str, pos: int) -> int | None:
    expected: list[str] = []
    for m in _JSON_TOKEN.finditer(text, pos):
        token = m.group()
        if token == '"':
            return PENDING
        if token in _CLOSER:
            expected.append(_CLOSER[token])
        elif token in ("}", "]"):
            if not expected or expected.pop() != token:
                raise JsonScanError(f"unbalanced {token!r} at {m.start()}")
            if not expected:
                return m.end()
    return PENDING
