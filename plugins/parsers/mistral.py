"""Mistral tool calls: a marker, then the calls in one of two layouts.

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

The first (JSON array; a single object without brackets is accepted too) is the older tokenizer
versions' layout, the second the newer ones' (one call per marker). Text before the marker is
normal text, and so is text after the calls.
"""
from __future__ import annotations

import json
import re

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.json_tools import JsonCallSyntax, JsonRegionParser
from kvyard_plugins.parsers.scanning import (Opener, RegionOutcome, ScannedCall, ToolSet,
                                             marker_opener)
from kvyard_plugins.parsers.text_scan import (PENDING, JsonScanError, Memo, held_suffix,
                                              scan_json_value, skip_ws)

BEGIN = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


class MistralParser(JsonRegionParser):
    name = "mistral"
    _syntaxes = {BEGIN: JsonCallSyntax(list_allowed=True)}

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        return marker_opener(text, pos, self._syntaxes, final)

    def structure_info(self, function_name: str) -> StructureInfo:
        return StructureInfo(begin=f'{BEGIN} [{{"name": {json.dumps(function_name)}, "arguments": ',
                             end="}]", trigger=BEGIN)

    def scan_body(self, text: str, opener: Opener, tools: ToolSet, final: bool,
                  memo: Memo) -> RegionOutcome:
        first = skip_ws(text, opener.body)
        if first < len(text) and text[first] not in "[{":
            return _scan_compact(text, opener, first, tools, final, memo)
        return super().scan_body(text, opener, tools, final, memo)


def _scan_compact(text: str, opener: Opener, name_start: int, tools: ToolSet, final: bool,
                  memo: Memo) -> RegionOutcome:
    """``name[ARGS]{...}`` after the marker: one call."""
    rejected = RegionOutcome([], opener.body)
    waiting = rejected if final else RegionOutcome([], None)
    name_end = _NAME.match(text, name_start).end()
    if not text.startswith(ARGS, name_end):
        held = held_suffix(text, name_end, [ARGS])
        return waiting if name_end + held == len(text) else rejected
    name = text[name_start:name_end]
    if name not in tools:
        return rejected
    start = skip_ws(text, name_end + len(ARGS))
    if start >= len(text):
        return rejected if final else RegionOutcome([ScannedCall(opener.start, name, "", False)], None)
    if text[start] != "{":
        return rejected
    try:
        end = scan_json_value(text, start, memo)
    except JsonScanError:
        return rejected
    if end is PENDING:
        partial = ScannedCall(opener.start, name, text[start:], False)
        return rejected if final else RegionOutcome([partial], None)
    try:
        if not isinstance(json.loads(text[start:end]), dict):
            return rejected
    except ValueError:
        return rejected
    return RegionOutcome([ScannedCall(opener.start, name, text[start:end], True)], end)
