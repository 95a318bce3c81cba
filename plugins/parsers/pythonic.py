"""Pythonic tool calls (Llama 3.2 / Llama 4 style): a Python list of calls with keyword arguments.

    [get_weather(city="Paris", days=3), get_time(zone="CET")]

The list is read with Python's ``ast``; argument values must be literals (strings, numbers,
True/False/None or true/false/null, lists, dicts with string keys). Text around the list is
normal text. A call list arrives in one piece while streaming: only a complete list is known to
be valid.
"""
from __future__ import annotations

import ast
import json
import re

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.scanning import (Opener, RegionOutcome, RegionToolCallParser,
                                             ScannedCall, ToolSet)
from kvyard_plugins.parsers.text_scan import MISMATCH, PENDING, Memo, resumable

_OPEN = re.compile(r"\[\s*[A-Za-z_]\w*\s*\(")
_MAYBE_OPEN = re.compile(r"\[\s*(?:[A-Za-z_]\w*\s*)?\Z")
_CLOSER = {"[": "]", "(": ")", "{": "}"}
_JSON_NAMES = {"true": True, "false": False, "null": None}


class PythonicParser(RegionToolCallParser):
    name = "pythonic"

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        m = _OPEN.search(text, pos)
        if m is not None:
            return Opener(m.start(), m.start() + 1)
        maybe = None if final else _MAYBE_OPEN.search(text, pos)
        return Opener(maybe.start(), None) if maybe else None

    def structure_info(self, function_name: str) -> StructureInfo | None:
        return None  # arguments are Python keywords, not one JSON object

    def scan_body(self, text: str, opener: Opener, tools: ToolSet, final: bool,
                  memo: Memo) -> RegionOutcome:
        end = resumable(memo, _ListEnd, opener.start).advance(text)
        if end is PENDING and not final:
            return RegionOutcome([], None)
        if end is PENDING or end == MISMATCH:
            return RegionOutcome([], opener.body)
        calls = _parse_calls(text[opener.start:end], tools)
        if calls is None:
            return RegionOutcome([], opener.body)
        return RegionOutcome([ScannedCall(opener.start + i, name, arguments, True)
                              for i, (name, arguments) in enumerate(calls)], end)


class _ListEnd:
    """Finds the "]" closing the list at ``start``, resuming across appends (see JsonValueEnd).

    Knows Python's quoting: strings in one or three single or double quotes; only the
    triple-quoted ones may span lines. ``advance`` returns the end, PENDING, or MISMATCH (unbalanced).
    """
    _OUTSIDE = re.compile(r"[\"'\[\](){}]")
    _INSIDE = {q: re.compile(r"\\|\n|" + re.escape(q)) for q in ("'", '"')}
    _INSIDE.update({q * 3: re.compile(r"\\|" + re.escape(q * 3)) for q in ("'", '"')})

    def __init__(self, start: int):
        self.pos = start
        self.expected: list[str] = []
        self.quote: str | None = None  # the open string's delimiter
        self.end: int | None = None

    def advance(self, text: str) -> int | None:
        while self.end is None:
            if self.quote is not None:
                step = self._leave_string(text)
            else:
                step = self._next_token(text)
            if step is not True:
                return step
        return self.end

    def _leave_string(self, text: str) -> bool | int | None:
        m = self._INSIDE[self.quote].search(text, self.pos)
        if m is None:  # no backslash in text[pos:]: only a partial closing quote may be pending
            self.pos = max(self.pos, len(text) - len(self.quote) + 1)
            return PENDING
        if m.group() == "\n":
            return MISMATCH
        if m.group() == "\\":
            if m.end() == len(text):
                self.pos = m.start()
                return PENDING
            self.pos = m.end() + 1
            return True
        self.quote, self.pos = None, m.end()
        return True

    def _next_token(self, text: str) -> bool | int | None:
        m = self._OUTSIDE.search(text, self.pos)
        if m is None:
            self.pos = len(text)
            return PENDING
        token, at = m.group(), m.start()
        if token in "'\"":
            triple = token * 3
            if at + 3 > len(text) and triple.startswith(text[at:]):
                self.pos = at  # two quotes may be an empty string or the start of three
                return PENDING
            self.quote = triple if text.startswith(triple, at) else token
            self.pos = at + len(self.quote)
            return True
        if token in _CLOSER:
            self.expected.append(_CLOSER[token])
        elif not self.expected or self.expected[-1] != token:
            return MISMATCH  # nothing moved: a later advance answers the same
        else:
            self.expected.pop()
            if not self.expected:
                self.end = at + 1
        self.pos = at + 1
        return True


def _parse_calls(source: str, tools: ToolSet) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] of a list of calls; None if any part is not a valid call."""
    try:
        tree = ast.parse(source, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        return [_call(node, tools) for node in tree.elts]
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return None


def _call(node: ast.expr, tools: ToolSet) -> tuple[str, str]:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError("not a call of a plain name")
    if node.func.id not in tools or node.args:
        raise ValueError(f"unknown tool {node.func.id!r} or positional arguments")
    if any(kw.arg is None for kw in node.keywords):
        raise ValueError("**kwargs in a tool call")
    arguments = {kw.arg: _literal(kw.value) for kw in node.keywords}
    return node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)


def _literal(node: ast.expr) -> object:
    """A JSON-compatible value of a literal expression (json.dumps rejects the rest)."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** inside a dict literal")
        keys = [_literal(k) for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("dict keys must be strings")
        return {k: _literal(v) for k, v in zip(keys, node.values)}
    return ast.literal_eval(node)
