"""Reasoning parser plugins through ReasoningParserFacade: complete and streamed output."""
import random

import pytest

from kvyard.parsers import ReasoningParserFacade
from kvyard.plugins import registry

# (parser, force_reasoning, output, expected reasoning, expected answer)
CASES = [
    ("deepseek-r1", None, "<think>\nLet me think: 2+2.\n</think>\n\nIt is 4.", "Let me think: 2+2.", "It is 4."),
    ("deepseek-r1", None, "No opening tag, still thinking…\n</think>Answer ✓", "No opening tag, still thinking…",
     "Answer ✓"),
    ("deepseek-r1", None, "  cut off while thinking", "cut off while thinking", ""),
    ("deepseek-r1", None, "a < b and </ not the end</think>done </think> again",
     "a < b and </ not the end", "done </think> again"),
    ("deepseek-r1", False, "Plain answer, <think>x</think>y", "x", "Plain answer, y"),
    ("qwen3", None, "Just an answer without thinking.", "", "Just an answer without thinking."),
    ("qwen3", None, "<think>\n思考 step one\n\nstep two\n</think>\n\n答案", "思考 step one\n\nstep two", "答案"),
    ("qwen3", None, "<think>\n\n</think>\n\nEmpty thinking.", "", "Empty thinking."),
    ("qwen3", True, "forced start</think>\nanswer", "forced start", "answer"),
    ("qwen3", True, "<think>forced with tag</think>answer", "forced with tag", "answer"),
    ("kimi", None, "◁think▷Kimi thinks◁/think▷Kimi answers", "Kimi thinks", "Kimi answers"),
    ("kimi", None, "no thinking at all ◁", "", "no thinking at all ◁"),
]


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(len(text) - 1, 30))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _stream(name, force, chunks, stream_reasoning=True):
    parser = ReasoningParserFacade(name, stream_reasoning=stream_reasoning, force_reasoning=force)
    parts = [parser.parse_stream_chunk(c) for c in chunks] + [parser.finish_stream()]
    return "".join(r for r, _ in parts), "".join(n for _, n in parts)


def test_builtin_reasoning_parsers_are_registered():
    assert {"deepseek-r1", "qwen3", "kimi"} <= set(registry("reasoning_parsers").names())


def test_unknown_reasoning_parser_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'.*deepseek-r1"):
        ReasoningParserFacade("nope")


@pytest.mark.parametrize("name,force,text,reasoning,answer", CASES)
def test_non_stream(name, force, text, reasoning, answer):
    assert ReasoningParserFacade(name, force_reasoning=force).parse_non_stream(text) == (reasoning, answer)


@pytest.mark.parametrize("name,force,text,reasoning,answer", CASES)
def test_random_chunks_match_non_stream(name, force, text, reasoning, answer):
    rng = random.Random(7)
    assert _stream(name, force, list(text)) == (reasoning, answer)
    for _ in range(40):
        assert _stream(name, force, _random_chunks(text, rng)) == (reasoning, answer)


@pytest.mark.parametrize("split", range(1, len("</think>")))
def test_end_marker_split_across_chunks(split):
    parser = ReasoningParserFacade("deepseek-r1")
    marker = "</think>"
    first = parser.parse_stream_chunk("reason" + marker[:split])
    assert first == ("reason", "")  # the marker's beginning is held back
    second = parser.parse_stream_chunk(marker[split:] + "answer")
    assert second == ("", "answer")


def test_start_marker_split_across_chunks():
    parser = ReasoningParserFacade("qwen3")
    assert parser.parse_stream_chunk("<th") == ("", "")
    assert parser.parse_stream_chunk("ink>abc</th") == ("abc", "")
    assert parser.parse_stream_chunk("ink>xyz") == ("", "xyz")


def test_a_held_marker_prefix_that_is_not_a_marker_comes_out():
    parser = ReasoningParserFacade("qwen3")
    assert parser.parse_stream_chunk("a <thi") == ("", "a ")
    assert parser.parse_stream_chunk("s is text") == ("", "<this is text")


def test_without_stream_reasoning_the_reasoning_comes_in_one_piece():
    text = "<think>step one, step two</think>final"
    chunks = [text[i:i + 3] for i in range(0, len(text), 3)]
    parser = ReasoningParserFacade("qwen3", stream_reasoning=False)
    parts = [parser.parse_stream_chunk(c) for c in chunks]
    reasoning = [r for r, _ in parts if r]
    assert reasoning == ["step one, step two"]
    assert "".join(n for _, n in parts) == "final"
    assert _stream("qwen3", None, chunks, stream_reasoning=False) == ("step one, step two", "final")


def test_unfinished_reasoning_is_released_at_the_end_of_the_stream():
    assert _stream("deepseek-r1", None, ["thinking ", "until cut </thi"], stream_reasoning=False) == \
        ("thinking until cut </thi", "")
