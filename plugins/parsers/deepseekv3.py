"""DeepSeek-V3 tool calls: special-token markers around a name and a fenced JSON arguments block.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Text before the first marker and after the closing one is normal text.
"""
from __future__ import annotations

import json

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.json_tools import CallRead, Progress
from kvyard_plugins.parsers.scanning import (Opener, RegionOutcome, RegionToolCallParser,
                                             ScannedCall, ToolSet, marker_opener)
from kvyard_plugins.parsers.text_scan import (MISMATCH, PENDING, JsonScanError, Memo, match_literal,
                                              scan_json_value, skip_ws)

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
_HEAD = "function" + SEP
_FENCE_OPEN = "```json"
_FENCE_CLOSE = "```"


class DeepSeekV3Parser(RegionToolCallParser):
    name = "deepseekv3"

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        return marker_opener(text, pos, {CALLS_BEGIN: None}, final)

    def structure_info(self, function_name: str) -> StructureInfo:
        # One call per calls block, so each structural tag is a complete region on its own.
        return StructureInfo(begin=f"{CALLS_BEGIN}{CALL_BEGIN}{_HEAD}{function_name}\n{_FENCE_OPEN}\n",
                             end=f"\n{_FENCE_CLOSE}{CALL_END}{CALLS_END}", trigger=CALLS_BEGIN)

    def scan_body(self, text: str, opener: Opener, tools: ToolSet, final: bool,
                  memo: Memo) -> RegionOutcome:
        calls: list[ScannedCall] = []
        pos = opener.body
        while True:
            at = skip_ws(text, pos)
            begin = match_literal(text, at, CALL_BEGIN)
            if begin is PENDING and not final:
                return RegionOutcome(calls, None)  # may also be the start of CALLS_END
            if begin is PENDING or begin == MISMATCH:
                return RegionOutcome(calls, _region_end(text, at, pos, final))
            read = _read_call(text, begin, tools, final, memo)
            if read.progress is Progress.PENDING:
                return RegionOutcome(calls, None)
            if read.progress is Progress.REJECTED:
                return RegionOutcome(calls, at)
            calls.append(ScannedCall(at, read.name, read.arguments, read.progress is Progress.DONE))
            if read.progress is Progress.PARTIAL:
                return RegionOutcome(calls, None)
            pos = read.end


def _region_end(text: str, at: int, pos: int, final: bool) -> int | None:
    """Past CALLS_END when it is at ``at``; else the region ends at ``pos``."""
    end = match_literal(text, at, CALLS_END)
    if end is PENDING:
        return pos if final else None
    return pos if end == MISMATCH else end


def _read_call(text: str, pos: int, tools: ToolSet, final: bool, memo: Memo) -> CallRead:
    """One call from just past CALL_BEGIN: head, name line, fenced arguments, trailer."""
    waiting = CallRead(Progress.REJECTED if final else Progress.PENDING)
    rejected = CallRead(Progress.REJECTED)
    head = match_literal(text, pos, _HEAD)
    if head is PENDING or head == MISMATCH:
        return waiting if head is PENDING else rejected
    newline = text.find("\n", head)
    if newline < 0:
        return waiting
    name = text[head:newline].strip()
    if name not in tools:
        return rejected
    args_start, args_end = _fenced_arguments(text, skip_ws(text, newline), memo)
    if args_start == MISMATCH or (final and args_end is PENDING):
        return rejected
    if args_end is PENDING:
        partial = "" if args_start is PENDING else text[args_start:]
        return CallRead(Progress.PARTIAL, name=name, arguments=partial)
    arguments = text[args_start:args_end]
    try:
        if not isinstance(json.loads(arguments), dict):
            return rejected
    except ValueError:
        return rejected
    end = _trailer_end(text, args_end, final)
    if end is PENDING:
        return CallRead(Progress.PARTIAL, name=name, arguments=arguments)
    return CallRead(Progress.DONE, end, name, arguments)


def _fenced_arguments(text: str, pos: int, memo: Memo) -> tuple[int | None, int | None]:
    """(start, end) of the arguments object after the ```json fence; PENDING/MISMATCH parts."""
    fence = match_literal(text, pos, _FENCE_OPEN)
    if fence is PENDING or fence == MISMATCH:
        return fence, PENDING
    start = skip_ws(text, fence)
    if start >= len(text):
        return PENDING, PENDING
    if text[start] != "{":
        return MISMATCH, PENDING
    try:
        return start, scan_json_value(text, start, memo)
    except JsonScanError:
        return MISMATCH, PENDING


def _trailer_end(text: str, pos: int, final: bool) -> int | None:
    """Past the closing fence and CALL_END; where matching stopped if they are missing."""
    for literal in (_FENCE_CLOSE, CALL_END):
        end = match_literal(text, skip_ws(text, pos), literal)
        if end is PENDING and not final:
            return PENDING
        if end is PENDING or end == MISMATCH:
            return pos
        pos = end
    return pos

