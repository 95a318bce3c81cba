"""Streaming by rescanning: one scan function serves complete and streamed output alike.

A format describes its output as call regions inside normal text: ``find_opener`` locates where
a region starts, ``scan_body`` reads the calls inside it. ``scan(text, final)`` turns a text into
normal-text spans and calls.

detect_and_parse scans the complete output once with final=True. Streaming appends each chunk
to a window and rescans it with final=False, where everything more text could still change is
held back (a partial marker, a region whose first call has no valid name yet), then emits only
what is new against what it already sent:
  - normal text by absolute position (stable spans only ever grow);
  - calls by the absolute offset where they start: the name once, then the growth of the
    arguments text (which is a slice of the output that only ever extends).
Everything before ``Scan.consumed`` is settled and scanning may restart there, so the window
drops it and rescans stay short. Because both paths run the same scan, a well-formed output
streams to exactly its non-stream result (the arguments are the output's own JSON text, byte for
byte, in both); a call that turns out malformed after its name was
streamed cannot be taken back (its text is then also sent as normal text).
"""
from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from kvyard.parsers import StreamingParseResult, ToolCallItem, ToolCallParser, ToolSpec, tool_names
from kvyard_plugins.parsers.text_scan import Memo, find_first, held_suffix

logger = logging.getLogger(__name__)


@dataclass
class ScannedCall:
    start: int       # where the call starts in the scanned text: its identity across rescans
    name: str        # always one of the request's tools
    arguments: str   # JSON text of the arguments so far; grows only by appending while streaming
    done: bool


@dataclass
class Scan:
    normal: list[tuple[int, int]] = field(default_factory=list)  # [start, end) spans, in order
    calls: list[ScannedCall] = field(default_factory=list)
    consumed: int = 0  # text[:consumed] is settled; scanning may restart there in normal mode

    def add_normal(self, start: int, end: int) -> None:
        if end > start:
            self.normal.append((start, end))


@dataclass(frozen=True)
class Opener:
    start: int                # first character of the region (its marker or leading whitespace)
    body: int | None          # where the calls begin; None: a region may start here, wait for text
    syntax: object = None     # format-specific description of the body


@dataclass
class RegionOutcome:
    calls: list[ScannedCall]
    end: int | None  # where normal text resumes; None: the region is still open (final=False only)


class ToolSet:
    """The function names a request allows."""

    def __init__(self, tools: Sequence[ToolSpec] | None):
        self.names = frozenset(tool_names(tools))

    def __contains__(self, name: object) -> bool:
        return name in self.names


class RegionToolCallParser(ToolCallParser):
    """Base of the built-in formats; subclasses implement find_opener and scan_body.

    A region whose first call is invalid (unknown name, malformed JSON, never finished at the end
    of the output) is normal text from its start up to ``Opener.body``, and scanning goes on
    from there. A region that holds valid calls and then an invalid one ends before the bad one.
    """

    def __init__(self) -> None:
        self._window = ""                  # unsettled tail of the streamed output
        self._window_start = 0             # its offset in the whole output
        self._normal_upto = 0              # normal text before this offset has been sent
        self._sent: dict[int, list[int]] = {}  # call start offset -> [call index, argument chars sent]
        self._memo: Memo = {}              # scanner states of the window; cleared when it shifts

    @abstractmethod
    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        """The first region start in text[pos:]; ``at_start``: pos is the start of the output."""

    @abstractmethod
    def scan_body(self, text: str, opener: Opener, tools: ToolSet, final: bool,
                  memo: Memo) -> RegionOutcome:
        """The calls of the region ``opener`` starts. With final=True the region must end.
        ``memo`` carries resumable scanner states between rescans of the growing text."""

    def has_tool_call(self, text: str) -> bool:
        return self.find_opener(text, 0, at_start=True, final=True) is not None

    def scan(self, text: str, tools: ToolSet, final: bool, at_start: bool, memo: Memo) -> Scan:
        scan, pos = Scan(), 0
        while True:
            opener = self.find_opener(text, pos, at_start, final)
            at_start = False
            if opener is None:
                scan.add_normal(pos, len(text))
                scan.consumed = len(text)
                return scan
            scan.add_normal(pos, opener.start)
            scan.consumed = opener.start
            if opener.body is None:
                return scan
            outcome = self.scan_body(text, opener, tools, final, memo)
            if not outcome.calls and outcome.end is not None:
                logger.debug("%s: no valid tool call, kept as text: %r", self.name,
                             text[opener.start:opener.start + 120])
                scan.add_normal(opener.start, opener.body)
                pos = opener.body
                continue
            scan.calls.extend(outcome.calls)
            if outcome.end is None:
                return scan
            pos = outcome.end

    def detect_and_parse(self, text: str, tools: Sequence[ToolSpec]) -> StreamingParseResult:
        scan = self.scan(text, ToolSet(tools), final=True, at_start=True, memo={})
        normal = "".join(text[s:e] for s, e in scan.normal)
        calls = [ToolCallItem(i, c.name, c.arguments) for i, c in enumerate(scan.calls)]
        return StreamingParseResult(normal, calls)

    def parse_streaming_increment(self, new_text: str, tools: Sequence[ToolSpec]) -> StreamingParseResult:
        self._window += new_text
        return self._emit(ToolSet(tools), final=False)

    def finish_stream(self, tools: Sequence[ToolSpec]) -> StreamingParseResult:
        return self._emit(ToolSet(tools), final=True)

    def _emit(self, tools: ToolSet, final: bool) -> StreamingParseResult:
        window, base = self._window, self._window_start
        scan = self.scan(window, tools, final, at_start=base == 0, memo=self._memo)
        pieces = []
        for start, end in scan.normal:
            start, end = start + base, end + base
            if end > self._normal_upto:
                pieces.append(window[max(start, self._normal_upto) - base:end - base])
                self._normal_upto = end
        calls = [item for call in scan.calls for item in self._call_delta(call, base)]
        if scan.consumed:
            self._window = window[scan.consumed:]
            self._window_start = base + scan.consumed
            self._memo.clear()  # its states are keyed by positions in the old window
        return StreamingParseResult("".join(pieces), calls)

    def _call_delta(self, call: ScannedCall, base: int) -> list[ToolCallItem]:
        sent = self._sent.get(base + call.start)
        items = []
        if sent is None:
            sent = self._sent[base + call.start] = [len(self._sent), 0]
            items.append(ToolCallItem(sent[0], call.name, ""))
        index, chars = sent
        if len(call.arguments) > chars:
            items.append(ToolCallItem(index, None, call.arguments[chars:]))
            sent[1] = len(call.arguments)
        return items


def marker_opener(text: str, pos: int, syntaxes: dict[str, object], final: bool) -> Opener | None:
    """A region opened by one of the literal markers in ``syntaxes`` (marker -> body syntax).

    A tail of the text that may be the beginning of a marker is held (Opener with body None).
    """
    found = find_first(text, pos, syntaxes)
    if found is not None:
        idx, marker = found
        return Opener(idx, idx + len(marker), syntaxes[marker])
    held = 0 if final else held_suffix(text, pos, syntaxes)
    return Opener(len(text) - held, None) if held else None
