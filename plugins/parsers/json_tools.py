"""Shared reading of JSON call objects ``{"name": ..., "arguments" | "parameters": {...}}``.

``read_call_object`` reads one call object from possibly partial text; ``JsonRegionParser`` reads
a region made of such objects, laid out as a ``JsonCallSyntax`` says (one object, a JSON array,
objects separated by ";", an optional closing marker). llama3, mistral, qwen25/hermes and the
generic json parser are JsonRegionParsers that differ only in how a region opens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from kvyard_plugins.parsers.scanning import (Opener, RegionOutcome, RegionToolCallParser,
                                             ScannedCall, ToolSet)
from kvyard_plugins.parsers.text_scan import (MISMATCH, PENDING, JsonScanError, Memo, match_literal,
                                              scan_json_string, scan_json_value, skip_ws)

ARGUMENT_KEYS = ("arguments", "parameters")


class Progress(Enum):
    PENDING = "pending"    # undecided: the name is not complete yet (never with final=True)
    REJECTED = "rejected"  # not a valid call of one of the tools
    PARTIAL = "partial"    # a valid name; the arguments are still arriving
    DONE = "done"


@dataclass(frozen=True)
class CallRead:
    progress: Progress
    end: int | None = None      # just past the closing brace (DONE)
    name: str | None = None     # PARTIAL, DONE
    arguments: str = ""         # JSON text of the arguments so far (PARTIAL) or in full (DONE)


_PENDING = CallRead(Progress.PENDING)
_REJECTED = CallRead(Progress.REJECTED)


@dataclass
class _ObjectFields:
    values: dict[str, tuple[int, int | None]]  # top-level key -> value [start, end or None)
    end: int | None = None                     # just past "}" once the object is complete


def _walk_object(text: str, pos: int, memo: Memo) -> _ObjectFields:
    """Top-level keys of the JSON object at text[pos] == "{", as far as the text goes."""
    fields = _ObjectFields({})
    i = pos + 1
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return fields
        if text[i] == "}":
            fields.end = i + 1
            return fields
        if text[i] != '"':
            raise JsonScanError(f"expected a key at {i}")
        key_end = scan_json_string(text, i)
        if key_end is PENDING:
            return fields
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return fields
        if text[i] != ":":
            raise JsonScanError(f"expected ':' at {i}")
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return fields
        value_end = scan_json_value(text, i, memo)
        fields.values.setdefault(key, (i, value_end))
        if value_end is PENDING:
            return fields
        i = skip_ws(text, value_end)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] != "}":
            raise JsonScanError(f"expected ',' or '}}' at {i}")


def read_call_object(text: str, pos: int, tools: ToolSet, final: bool, memo: Memo) -> CallRead:
    """Reads the call object at text[pos] == "{". An incomplete object is REJECTED if final."""
    try:
        fields = _walk_object(text, pos, memo)
        name = _complete_name(text, fields)
    except ValueError:  # JsonScanError, or a string json.loads refuses
        return _REJECTED
    if name is None:
        return _REJECTED if final or fields.end is not None else _PENDING
    if name not in tools:
        return _REJECTED
    if fields.end is not None:
        return _finished_call(text, pos, fields, name)
    if final:
        return _REJECTED
    return _partial_call(text, fields, name)


def _complete_name(text: str, fields: _ObjectFields) -> str | None:
    """The name string once complete; None while it is still arriving."""
    span = fields.values.get("name")
    if span is None:
        return None
    if text[span[0]] != '"':
        raise JsonScanError("the name is not a string")
    return None if span[1] is None else json.loads(text[span[0]:span[1]])


def _arguments_key(fields: _ObjectFields) -> str | None:
    return next((k for k in ARGUMENT_KEYS if k in fields.values), None)


def _finished_call(text: str, pos: int, fields: _ObjectFields, name: str) -> CallRead:
    try:
        call = json.loads(text[pos:fields.end])
    except ValueError:
        return _REJECTED
    key = _arguments_key(fields)
    if key is None:
        return CallRead(Progress.DONE, fields.end, name, "{}")
    arguments = call[key]
    if isinstance(arguments, dict):
        start, end = fields.values[key]
        return CallRead(Progress.DONE, fields.end, name, text[start:end])
    if isinstance(arguments, str):  # some models send the arguments JSON-encoded in a string
        try:
            decoded = json.loads(arguments)
        except ValueError:
            return _REJECTED
        if isinstance(decoded, dict):
            return CallRead(Progress.DONE, fields.end, name, json.dumps(decoded, ensure_ascii=False))
    return _REJECTED


def _partial_call(text: str, fields: _ObjectFields, name: str) -> CallRead:
    """Streams an arguments object as its raw text; a string-encoded one only once complete."""
    key = _arguments_key(fields)
    if key is None:
        return CallRead(Progress.PARTIAL, name=name)
    start, end = fields.values[key]
    if text[start] == '"':
        return CallRead(Progress.PARTIAL, name=name)
    if text[start] != "{":
        return _REJECTED
    return CallRead(Progress.PARTIAL, name=name, arguments=text[start:end or len(text)])


@dataclass(frozen=True)
class JsonCallSyntax:
    """How call objects are laid out in one region of a format."""
    closer: str | None = None     # ends the region, e.g. "</tool_call>"; tolerated when missing
    list_allowed: bool = False    # the region may hold a JSON array of call objects
    separator: str | None = None  # between bare call objects, e.g. ";" (None: one object)


class _Step(Enum):
    NEXT = "next"   # another call object follows at the returned position
    END = "end"     # the sequence of objects ended at the returned position
    WAIT = "wait"   # more text is needed to decide


class JsonRegionParser(RegionToolCallParser):
    """A region of call objects; subclasses supply find_opener and Opener.syntax."""

    def scan_body(self, text: str, opener: Opener, tools: ToolSet, final: bool,
                  memo: Memo) -> RegionOutcome:
        syntax: JsonCallSyntax = opener.syntax
        calls: list[ScannedCall] = []
        pos = skip_ws(text, opener.body)
        in_list = syntax.list_allowed and text.startswith("[", pos)
        if in_list:
            pos = skip_ws(text, pos + 1)
        while True:
            if pos >= len(text):
                return RegionOutcome(calls, pos if final else None)
            if text[pos] != "{":
                return RegionOutcome(calls, pos)
            read = read_call_object(text, pos, tools, final, memo)
            if read.progress is Progress.PENDING:
                return RegionOutcome(calls, None)
            if read.progress is Progress.REJECTED:
                return RegionOutcome(calls, pos)
            calls.append(ScannedCall(pos, read.name, read.arguments, read.progress is Progress.DONE))
            if read.progress is Progress.PARTIAL:
                return RegionOutcome(calls, None)
            step, pos = self._after_object(text, read.end, syntax, in_list, final)
            if step is _Step.WAIT:
                return RegionOutcome(calls, None)
            if step is _Step.END:
                return RegionOutcome(calls, self._close(text, pos, syntax, final))

    @staticmethod
    def _after_object(text: str, pos: int, syntax: JsonCallSyntax, in_list: bool,
                      final: bool) -> tuple[_Step, int]:
        after = skip_ws(text, pos)
        if after >= len(text) and (in_list or syntax.separator):
            return (_Step.END, pos) if final else (_Step.WAIT, pos)
        if in_list:
            if text[after] == ",":
                return _Step.NEXT, skip_ws(text, after + 1)
            return (_Step.END, after + 1) if text[after] == "]" else (_Step.END, pos)
        if syntax.separator:
            sep_end = match_literal(text, after, syntax.separator)
            if sep_end is PENDING and not final:
                return _Step.WAIT, pos
            if sep_end is PENDING or sep_end == MISMATCH:
                return _Step.END, pos
            nxt = skip_ws(text, sep_end)
            if nxt >= len(text):
                return (_Step.END, nxt) if final else (_Step.WAIT, pos)
            return (_Step.NEXT, nxt) if text[nxt] == "{" else (_Step.END, pos)
        return _Step.END, pos

    @staticmethod
    def _close(text: str, pos: int, syntax: JsonCallSyntax, final: bool) -> int | None:
        """Where the region ends: past its closer if one follows, else at ``pos``."""
        if syntax.closer is None:
            return pos
        at = skip_ws(text, pos)
        end = match_literal(text, at, syntax.closer)
        if end is PENDING:
            return pos if final else None
        return pos if end == MISMATCH else end
