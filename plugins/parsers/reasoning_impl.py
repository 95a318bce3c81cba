"""Reasoning parsers for models that wrap their thinking in a start and an end marker.

One state machine serves every format and both modes: parse_non_stream feeds the whole text to a
fresh machine and flushes it, streaming feeds chunks and holds back any tail that may be the
beginning of a marker. Whitespace around the reasoning and before the answer is dropped (it is
only the newline after ``<think>`` / ``</think>``); a held tail of whitespace comes out with the
next text that is not whitespace.

    deepseek-r1  the output starts inside the thinking (the template opened it): text before
                 ``</think>`` is reasoning with or without ``<think>``; no ``</think>`` at all
                 means everything is reasoning.
    qwen3        ``<think>...</think>`` only where ``<think>`` appears; force_reasoning=True
                 behaves as deepseek-r1 (Qwen3 "thinking" checkpoints whose template opens it).
    kimi         ``◁think▷...◁/think▷``, only where the start marker appears.

Thinking budget (reasoning effort): every parser here closes the section by forcing its end
marker (``</think>``, ``◁/think▷``). deepseek-r1 (and qwen3 with force_reasoning) count from the
first output token; qwen3 and kimi count from their start marker, and a model that never opens
the section is never cut.
"""
from __future__ import annotations

from enum import Enum
from typing import ClassVar

from kvyard.parsers import ReasoningParser
from kvyard_plugins.parsers.text_scan import MISMATCH, PENDING, held_suffix, match_literal, skip_ws


class _State(Enum):
    BEFORE = "before"        # answer text; reasoning starts at the start marker
    OPENING = "opening"      # inside reasoning at output start; an optional start marker may come
    LEAD = "lead"            # inside reasoning, dropping leading whitespace
    REASONING = "reasoning"  # inside reasoning; it ends at the end marker
    TRAIL = "trail"          # after reasoning, dropping whitespace before the answer
    ANSWER = "answer"        # everything is answer text


class MarkerReasoningParser(ReasoningParser):
    start_marker: ClassVar[str] = "<think>"
    end_marker: ClassVar[str] = "</think>"
    starts_inside: ClassVar[bool] = False  # default when force_reasoning is None

    def __init__(self, stream_reasoning: bool = True, force_reasoning: bool | None = None):
        super().__init__(stream_reasoning, force_reasoning)
        inside = self.starts_inside if force_reasoning is None else force_reasoning
        self._state = _State.OPENING if inside else _State.BEFORE
        self._buffer = ""          # text not yet classified
        self._held_reasoning = ""  # reasoning kept until its end when stream_reasoning is False

    def thinking_markers(self) -> tuple[str | None, str]:
        inside = self.starts_inside if self.force_reasoning is None else self.force_reasoning
        return (None if inside else self.start_marker), self.end_marker

    def parse_non_stream(self, text: str) -> tuple[str, str]:
        fresh = type(self)(self.stream_reasoning, self.force_reasoning)
        fresh._buffer = text
        return fresh._advance(final=True)

    def parse_stream_chunk(self, delta: str) -> tuple[str, str]:
        self._buffer += delta
        return self._advance(final=False)

    def finish_stream(self) -> tuple[str, str]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        normal: list[str] = []
        while self._step(final, reasoning, normal):
            pass
        return self._release(reasoning, final), "".join(normal)

    def _release(self, reasoning: list[str], final: bool) -> str:
        """Reasoning to emit now: all of it when streaming, else only once it has ended."""
        if self.stream_reasoning:
            return "".join(reasoning)
        self._held_reasoning += "".join(reasoning)
        if final or self._state in (_State.TRAIL, _State.ANSWER):
            out, self._held_reasoning = self._held_reasoning, ""
            return out
        return ""

    def _step(self, final: bool, reasoning: list[str], normal: list[str]) -> bool:
        """Classifies a piece of the buffer; False when it must wait for more text (or is done)."""
        buf, state = self._buffer, self._state
        if state is _State.BEFORE:
            idx = buf.find(self.start_marker)
            if idx >= 0:
                normal.append(buf[:idx])
                return self._move(buf[idx + len(self.start_marker):], _State.LEAD)
            keep = 0 if final else held_suffix(buf, 0, [self.start_marker])
            normal.append(buf[:len(buf) - keep])
            self._buffer = buf[len(buf) - keep:]
            return False
        if state is _State.OPENING:
            end = match_literal(buf, skip_ws(buf, 0), self.start_marker)
            if end is PENDING and not final:
                return False
            return self._move(buf if end is PENDING or end == MISMATCH else buf[end:], _State.LEAD)
        if state in (_State.LEAD, _State.TRAIL):
            stripped = buf.lstrip()
            self._buffer = stripped
            if not stripped:
                return False
            self._state = _State.REASONING if state is _State.LEAD else _State.ANSWER
            return True
        if state is _State.REASONING:
            return self._step_reasoning(final, reasoning)
        normal.append(buf)
        self._buffer = ""
        return False

    def _step_reasoning(self, final: bool, reasoning: list[str]) -> bool:
        buf = self._buffer
        idx = buf.find(self.end_marker)
        if idx >= 0:
            reasoning.append(buf[:idx].rstrip())
            return self._move(buf[idx + len(self.end_marker):], _State.TRAIL)
        keep = 0 if final else held_suffix(buf, 0, [self.end_marker])
        ready = buf[:len(buf) - keep].rstrip()  # trailing whitespace waits: it may precede the end
        reasoning.append(ready)
        self._buffer = buf[len(ready):]
        return False

    def _move(self, rest: str, state: _State) -> bool:
        self._buffer, self._state = rest, state
        return True


class DeepSeekR1Parser(MarkerReasoningParser):
    name = "deepseek-r1"
    starts_inside = True


class Qwen3Parser(MarkerReasoningParser):
    name = "qwen3"


class KimiParser(MarkerReasoningParser):
    name = "kimi"
    start_marker = "◁think▷"
    end_marker = "◁/think▷"
