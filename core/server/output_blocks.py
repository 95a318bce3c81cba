"""One generated turn as a sequence of output blocks: reasoning, text, tool calls.

The Responses API (output items) and the Anthropic Messages API (content blocks) both present a
turn as blocks, one open at a time while streaming. ``blocks_of`` builds them from a finished chat
choice message; ``BlockAssembler`` builds them from the chat stream deltas of
openai_chat.ChoiceStreamParser and says when each opens, grows and closes, for the API modules to
render as their own events.

Invariants: block indices are 0, 1, ... in opening order and a block opens only after the
previous one closed; a tool-call block opens with its call id and name, and its deltas are
argument text whose concatenation is the call's arguments; a text block never holds only
whitespace next to tool calls (held back, dropped at the end if a call came).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

REASONING, TEXT, TOOL_CALL = "reasoning", "text", "tool_call"


@dataclass
class Block:
    index: int
    kind: str                       # REASONING | TEXT | TOOL_CALL
    text: str = ""                  # the reasoning / text, or the call's arguments JSON
    call_id: Optional[str] = None   # TOOL_CALL
    name: Optional[str] = None      # TOOL_CALL


@dataclass(frozen=True)
class BlockEvent:
    op: str          # "open" | "delta" | "close"
    block: Block
    delta: str = ""


def blocks_of(message: dict) -> list[Block]:
    """Blocks of a chat choice message {"content", "reasoning_content", "tool_calls"}."""
    blocks: list[Block] = []
    calls = message.get("tool_calls") or []
    if message.get("reasoning_content"):
        blocks.append(Block(len(blocks), REASONING, message["reasoning_content"]))
    text = message.get("content") or ""
    if text and not (calls and not text.strip()):
        blocks.append(Block(len(blocks), TEXT, text))
    for call in calls:
        fn = call["function"]
        blocks.append(Block(len(blocks), TOOL_CALL, fn.get("arguments") or "", call["id"], fn["name"]))
    return blocks


class BlockAssembler:
    """Chat stream deltas -> BlockEvents; ``blocks`` holds every block so far."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._open: Optional[Block] = None
        self._calls: dict[int, Block] = {}   # chat tool_call index -> its block
        self._held_ws = ""                   # whitespace waiting to open a text block

    def feed(self, delta: dict) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if delta.get("reasoning_content"):
            events += self._text_like(REASONING, delta["reasoning_content"])
        if delta.get("content"):
            events += self._content(delta["content"])
        for call in delta.get("tool_calls") or []:
            events += self._call(call)
        return events

    def finish(self) -> list[BlockEvent]:
        events = []
        if self._held_ws and not self._calls:
            events += self._text_like(TEXT, self._held_ws)
        self._held_ws = ""
        return events + self._close()

    def _content(self, text: str) -> list[BlockEvent]:
        if not (self._open and self._open.kind == TEXT) and not text.strip():
            self._held_ws += text
            return []
        text, self._held_ws = self._held_ws + text, ""
        return self._text_like(TEXT, text)

    def _text_like(self, kind: str, text: str) -> list[BlockEvent]:
        events = [] if self._open and self._open.kind == kind else self._start(Block(len(self.blocks), kind))
        self._open.text += text
        return events + [BlockEvent("delta", self._open, text)]

    def _call(self, call: dict) -> list[BlockEvent]:
        events = []
        fn = call.get("function") or {}
        block = self._calls.get(call["index"])
        if block is None:
            block = Block(len(self.blocks), TOOL_CALL, call_id=call.get("id"), name=fn.get("name"))
            self._calls[call["index"]] = block
            events += self._start(block)
        args = fn.get("arguments") or ""
        if args:
            block.text += args
            events.append(BlockEvent("delta", block, args))
        return events

    def _start(self, block: Block) -> list[BlockEvent]:
        events = self._close()
        self.blocks.append(block)
        self._open = block
        return events + [BlockEvent("open", block)]

    def _close(self) -> list[BlockEvent]:
        if self._open is None:
            return []
        block, self._open = self._open, None
        return [BlockEvent("close", block)]
