"""Chunk-boundary property of every tool-call and reasoning parser.

The same model output is streamed cut at every possible boundary (two chunks split at each
position), one character per chunk, in fixed strides (as ``--stream-interval`` > 1 delivers it)
and in one piece. Whatever the cut, the stream must give exactly the non-stream result: the same
normal text, and for each call the name first, then argument deltas that concatenate character
for character to the non-stream arguments, with indices 0, 1, ... in order (parallel calls
keep theirs). Reasoning parsers: the same reasoning and answer text.
"""
import pytest

from kvyard.parsers import FunctionCallParser, ReasoningParserFacade
from kvyard.plugins import registry

from test_reasoning_parsers import CASES as REASONING_CASES
from test_tool_parsers import CASES as TOOL_CASES
from test_tool_parsers import MALFORMED, TOOLS

STRIDES = (2, 3, 5, 8)
RAW = '{"city":"Oslo" ,  "unit" :"c"}'  # arguments as a model may space them: kept byte for byte
DS = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
RAW_CASES = {
    "qwen25": f'<tool_call>{{"name":"get_weather","arguments":{RAW}}}</tool_call><tool_call>{{"name":"get_time"}}</tool_call>',
    "llama3": f'<|python_tag|>{{"name":"get_weather","parameters":{RAW}}};{{"name":"search","parameters":{{}}}}',
    "mistral": f'[TOOL_CALLS][{{"name":"get_weather","arguments":{RAW}}},{{"name":"get_time","arguments":{{}}}}]',
    "json": f'[{{"name":"get_weather","arguments":{RAW}}}]',
    "deepseekv3": DS.format("get_weather", RAW),
}


def _cuts(text: str):
    """Every way of chunking ``text`` this test drives: (label, chunks)."""
    yield "whole", [text]
    yield "chars", list(text)
    for stride in STRIDES:
        yield f"stride{stride}", [text[i:i + stride] for i in range(0, len(text), stride)]
    for cut in range(1, len(text)):
        yield f"split@{cut}", [text[:cut], text[cut:]]


def _stream_tools(parser_name: str, chunks: list[str]) -> tuple[str, list[tuple[int, str, str]]]:
    parser = FunctionCallParser(TOOLS, parser_name)
    normal, calls = [], []
    for text, items in [parser.parse_stream_chunk(c) for c in chunks] + [parser.finish_stream()]:
        normal.append(text)
        for item in items:
            if item.name is not None:  # a call opens with its name, before any argument
                assert item.tool_index == len(calls) and item.parameters == ""
                calls.append([item.tool_index, item.name, ""])
            else:
                assert 0 <= item.tool_index < len(calls), "an argument delta before its call's name"
                calls[item.tool_index][2] += item.parameters
    return "".join(normal), [tuple(c) for c in calls]


def test_every_registered_parser_is_covered():
    assert set(registry("tool_call_parsers").names()) <= set(TOOL_CASES)
    assert set(registry("reasoning_parsers").names()) <= {c[0] for c in REASONING_CASES}


@pytest.mark.parametrize("parser_name", sorted(TOOL_CASES))
def test_tool_call_stream_equals_non_stream_at_every_cut(parser_name):
    for text, _, _ in TOOL_CASES[parser_name]:
        normal, items = FunctionCallParser(TOOLS, parser_name).parse_non_stream(text)
        expected = (normal, [(c.tool_index, c.name, c.parameters) for c in items])
        for label, chunks in _cuts(text):
            assert _stream_tools(parser_name, chunks) == expected, (label, text)


@pytest.mark.parametrize("parser_name", sorted(RAW_CASES))
def test_arguments_are_the_models_own_text(parser_name):
    text = RAW_CASES[parser_name]
    _, items = FunctionCallParser(TOOLS, parser_name).parse_non_stream(text)
    assert items[0].name == "get_weather" and items[0].parameters == RAW
    expected = [(c.tool_index, c.name, c.parameters) for c in items]
    for label, chunks in _cuts(text):
        assert _stream_tools(parser_name, chunks) == ("", expected), label


@pytest.mark.parametrize("parser_name", sorted(MALFORMED))
def test_malformed_output_streams_its_text_at_every_cut(parser_name):
    """No call is valid: the whole output comes back as text wherever it is cut (a call whose
    name streamed before it turned out malformed cannot be taken back, but its text comes too)."""
    for text in MALFORMED[parser_name]:
        assert FunctionCallParser(TOOLS, parser_name).parse_non_stream(text) == (text, [])
        for label, chunks in _cuts(text):
            assert _stream_tools(parser_name, chunks)[0] == text, (label, text)


@pytest.mark.parametrize("case", REASONING_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("stream_reasoning", [True, False])
def test_reasoning_stream_equals_non_stream_at_every_cut(case, stream_reasoning):
    name, force, text, _, _ = case
    expected = ReasoningParserFacade(name, force_reasoning=force).parse_non_stream(text)
    for label, chunks in _cuts(text):
        parser = ReasoningParserFacade(name, stream_reasoning=stream_reasoning, force_reasoning=force)
        parts = [parser.parse_stream_chunk(c) for c in chunks] + [parser.finish_stream()]
        got = "".join(r for r, _ in parts), "".join(n for _, n in parts)
        assert got == expected, (label, text)
