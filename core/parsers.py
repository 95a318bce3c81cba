"""Tool-call and reasoning parsers: the interfaces plugins implement, and the facades the server uses.

A model announces tool calls and thinking in its own text format (Qwen's ``<tool_call>`` tags,
Llama's ``<|python_tag|>``, DeepSeek-R1's ``</think>`` ...). A plugin registered under
``tool_call_parsers`` or ``reasoning_parsers`` turns that text back into structured parts. The
core never imports a plugin: the facades look the class up in the registry by name.

Lifecycle: one parser instance per request. The non-stream methods are pure; the streaming
methods keep state across chunks, so a streamed response needs its own instance.

Streaming invariant (both kinds): for well-formed output, the concatenation of everything a
parser emits over all chunks, followed by ``finish_stream()``, equals the non-stream result,
wherever the chunks are cut: a tool call streams as its name item, then argument deltas whose
concatenation is exactly (character for character) the non-stream arguments text, with the same
``tool_index``. tests/unit/parsers/test_parser_chunk_boundaries.py checks every built-in at every cut.
Text that might be the start of a marker is held back until the next chunk decides it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from kvyard.plugins import registry

ToolSpec = Any  # an OpenAI tool: {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass(frozen=True)
class ToolCallItem:
    """One call, or one piece of a call while streaming.

    tool_index: the ordinal of the call in this response (0, 1, ...), the OpenAI stream ``index``.
    name: the function name; in a stream it is set only on the call's first item.
    parameters: JSON text of the arguments; in a stream, a delta to append to what came before.
    """
    tool_index: int
    name: str | None
    parameters: str


@dataclass
class StreamingParseResult:
    normal_text: str = ""
    calls: list[ToolCallItem] = field(default_factory=list)


@dataclass(frozen=True)
class StructureInfo:
    """How one call of ``function`` looks in a format: ``begin`` + arguments JSON + ``end``.

    ``trigger`` is the text that starts any call, so a grammar can stay free until it appears
    (xgrammar's structural tags take exactly these three strings).
    """
    begin: str
    end: str
    trigger: str


def tool_function(tool: ToolSpec) -> dict:
    """The ``function`` part of an OpenAI tool as a dict (accepts dicts and pydantic models)."""
    if hasattr(tool, "model_dump"):
        tool = tool.model_dump()
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"tools: each tool needs function.name, got {tool!r}")
    return function


def tool_names(tools: Sequence[ToolSpec] | None) -> list[str]:
    """Function names of an OpenAI tools list, in order."""
    return [tool_function(t)["name"] for t in tools or ()]


class ToolCallParser(ABC):
    """Finds tool calls in a model's output for one format. One instance per request.

    ``tools`` is the request's OpenAI tools list; a call naming a function outside it, or one
    whose JSON is malformed, is never raised as an error: its text comes back as normal text.
    """
    name: ClassVar[str] = ""

    @abstractmethod
    def has_tool_call(self, text: str) -> bool:
        """Whether ``text`` contains the start of a call in this format (a cheap check)."""

    @abstractmethod
    def detect_and_parse(self, text: str, tools: Sequence[ToolSpec]) -> StreamingParseResult:
        """A complete output: its normal text and every call, parameters as full JSON."""

    @abstractmethod
    def parse_streaming_increment(self, new_text: str, tools: Sequence[ToolSpec]) -> StreamingParseResult:
        """The next chunk of output. A call is emitted first as (name, parameters=""), then as
        argument deltas (name=None) whose concatenation is the arguments JSON."""

    def finish_stream(self, tools: Sequence[ToolSpec]) -> StreamingParseResult:
        """The stream ended: release what was held back waiting for more text."""
        return StreamingParseResult()

    @abstractmethod
    def structure_info(self, function_name: str) -> StructureInfo | None:
        """The text around one call's arguments JSON; None if the format has no such shape."""


class ReasoningParser(ABC):
    """Splits a model's output into reasoning (thinking) text and the answer. One per request.

    stream_reasoning: False holds the reasoning back and emits it in one piece when it ends.
    force_reasoning: the output starts inside the reasoning block (the chat template already
    opened it); None keeps the parser's own default.
    """
    name: ClassVar[str] = ""

    def __init__(self, stream_reasoning: bool = True, force_reasoning: bool | None = None):
        self.stream_reasoning = stream_reasoning
        self.force_reasoning = force_reasoning

    @abstractmethod
    def parse_non_stream(self, text: str) -> tuple[str, str]:
        """(reasoning_text, normal_text) of a complete output."""

    @abstractmethod
    def parse_stream_chunk(self, delta: str) -> tuple[str, str]:
        """(reasoning_delta, normal_delta) for the next chunk of output."""

    def finish_stream(self) -> tuple[str, str]:
        """The stream ended: (reasoning_delta, normal_delta) that were held back."""
        return "", ""

    def thinking_markers(self) -> tuple[str | None, str] | None:
        """(start, end) marker texts a thinking budget watches and forces: start None when the
        output starts inside the thinking. None: this format cannot be closed by force."""
        return None


def _lookup(kind: str, name: str) -> type:
    reg = registry(kind)
    if name not in reg:
        raise ValueError(reg.unknown_message(name))
    return reg.get(name)  # type: ignore[return-value]


class FunctionCallParser:
    """The server's view of tool calling for one request: ``tools`` + the chosen parser's name."""

    def __init__(self, tools: Sequence[ToolSpec], tool_call_parser: str):
        self.tools = list(tools or [])
        tool_names(self.tools)  # a malformed tools list fails here, not mid-stream
        self.detector: ToolCallParser = _lookup("tool_call_parsers", tool_call_parser)()

    def has_tool_call(self, text: str) -> bool:
        return self.detector.has_tool_call(text)

    def parse_non_stream(self, text: str) -> tuple[str, list[ToolCallItem]]:
        result = self.detector.detect_and_parse(text, self.tools)
        return result.normal_text, result.calls

    def parse_stream_chunk(self, delta: str) -> tuple[str, list[ToolCallItem]]:
        result = self.detector.parse_streaming_increment(delta, self.tools)
        return result.normal_text, result.calls

    def finish_stream(self) -> tuple[str, list[ToolCallItem]]:
        result = self.detector.finish_stream(self.tools)
        return result.normal_text, result.calls

    def structure_info(self, function_name: str) -> StructureInfo | None:
        return self.detector.structure_info(function_name)


class ReasoningParserFacade:
    """The server's view of reasoning extraction for one request."""

    def __init__(self, name: str, stream_reasoning: bool = True, force_reasoning: bool | None = None):
        cls = _lookup("reasoning_parsers", name)
        self.parser: ReasoningParser = cls(stream_reasoning=stream_reasoning,
                                           force_reasoning=force_reasoning)

    def parse_non_stream(self, text: str) -> tuple[str, str]:
        return self.parser.parse_non_stream(text)

    def parse_stream_chunk(self, delta: str) -> tuple[str, str]:
        return self.parser.parse_stream_chunk(delta)

    def finish_stream(self) -> tuple[str, str]:
        return self.parser.finish_stream()

    def thinking_markers(self) -> tuple[str | None, str] | None:
        return self.parser.thinking_markers()
