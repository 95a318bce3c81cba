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
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"')  # unrolled: no per-char alternation
# Numbers and true/false/null; json.loads checks the spelling once the value is complete.
_JSON_SCALAR = re.compile(r"[-+0-9.eEa-zA-Z]+")
_CLOSER = {"{": "}", "[": "]"}


# Scanner states kept between rescans of one growing text, keyed by (scanner class, start).
# Valid only while the text grows by appending; whoever shifts or replaces the text clears it.
Memo = dict


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


def scan_json_value(text: str, pos: int, memo: Memo | None = None) -> int | None:
    """End of the JSON value starting at text[pos]; PENDING if the text ends first.

    A scalar touching the end of the text is PENDING too (``12`` may become ``123``).
    """
    if pos >= len(text):
        return PENDING
    first = text[pos]
    if first == '"' or first in _CLOSER:
        return resumable(memo, JsonValueEnd, pos).advance(text)
    m = _JSON_SCALAR.match(text, pos)
    if m is None:
        raise JsonScanError(f"unexpected {first!r} at {pos}")
    return m.end() if m.end() < len(text) else PENDING


def resumable(memo: Memo | None, kind: type, pos: int):
    """The scanner of ``kind`` for the value at ``pos``: the memo's one if a previous scan of
    the same growing text started it, else a new one (kept in the memo when there is one)."""
    if memo is None:
        return kind(pos)
    scanner = memo.get((kind, pos))
    if scanner is None:
        scanner = memo[(kind, pos)] = kind(pos)
    return scanner


class JsonValueEnd:
    """Finds where the JSON container or string starting at ``start`` ends, incrementally.

    ``advance`` may be called again after more text was appended: it resumes where it stopped,
    so streaming a long argument costs time linear in its length, not quadratic. Characters
    other than quotes and brackets are not checked (json.loads checks the finished value).
    """
    _OUTSIDE = re.compile(r'["{}\[\]]')
    _INSIDE = re.compile(r'[\\"]')

    def __init__(self, start: int):
        self.pos = start              # where scanning resumes
        self.expected: list[str] = []  # closing brackets still owed, innermost last
        self.in_string = False
        self.end: int | None = None

    def advance(self, text: str) -> int | None:
        while self.end is None:
            if self.in_string:
                if not self._leave_string(text):
                    return PENDING
                continue
            m = self._OUTSIDE.search(text, self.pos)
            if m is None:
                self.pos = len(text)
                return PENDING
            self._token(m.group(), m.start())
        return self.end

    def _leave_string(self, text: str) -> bool:
        """Moves past the next escape or the closing quote; False if the text ends first."""
        m = self._INSIDE.search(text, self.pos)
        if m is None:
            self.pos = len(text)
            return False
        if m.group() == "\\":
            if m.end() == len(text):  # the escaped character has not arrived yet
                self.pos = m.start()
                return False
            self.pos = m.end() + 1
            return True
        self.in_string = False
        self.pos = m.end()
        if not self.expected:
            self.end = self.pos  # the value was a bare string
        return True

    def _token(self, token: str, at: int) -> None:
        if token == '"':
            self.in_string = True
        elif token in _CLOSER:
            self.expected.append(_CLOSER[token])
        elif not self.expected or self.expected[-1] != token:
            raise JsonScanError(f"unbalanced {token!r} at {at}")  # pos stays: raises again
        else:
            self.expected.pop()
            if not self.expected:
                self.end = at + 1
        self.pos = at + 1
