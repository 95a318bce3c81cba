"""Tool-call parser plugins through the FunctionCallParser facade: complete and streamed output.

Every hand-written output is parsed whole, then streamed in seeded random chunks (and one
character at a time): the streamed normal text and the calls reassembled from the name item and
the argument deltas must equal the non-stream result.
"""
import json
import random

import pytest

from kvyard.parsers import FunctionCallParser, ToolCallItem
from kvyard.plugins import registry

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string"},
                                                                    "unit": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
W = {"city": "Zürich", "unit": "celsius"}
S = {"query": "naïve \"quotes\" 日本 \\ end", "filters": {"years": [2020, 2021],
                                                       "tags": {"a": None, "b": True}},
     "limit": 5.5}
WJ = json.dumps(W, ensure_ascii=False)
SJ = json.dumps(S, ensure_ascii=False)
DS_CALLS, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"


def ds_call(name, args_json):
    return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args_json}\n```<｜tool▁call▁end｜>"


# parser -> [(output, expected normal text, expected [(name, arguments)])]
CASES = {
    "qwen25": [
        ("Hello there, no tools needed.", "Hello there, no tools needed.", []),
        (f'<tool_call>\n{{"name": "get_weather", "arguments": {WJ}}}\n</tool_call>', "",
         [("get_weather", W)]),
        (f'Let me check 🌦.\n<tool_call>\n{{"name": "get_weather", "arguments": {WJ}}}\n</tool_call>\n'
         f'<tool_call>\n{{"arguments": {SJ}, "name": "search"}}\n</tool_call>\nDone.',
         "Let me check 🌦.\n\n\nDone.", [("get_weather", W), ("search", S)]),
        ('<tool_call>{"name": "get_time"}</tool_call> and a < sign',
         " and a < sign", [("get_time", {})]),
        ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>',
         "", [("get_weather", {"city": "Oslo"})]),
    ],
    "llama3": [
        ("The weather is fine.", "The weather is fine.", []),
        (f'{{"name": "get_weather", "parameters": {WJ}}}', "", [("get_weather", W)]),
        (f'<|python_tag|>{{"name": "get_weather", "parameters": {WJ}}}; '
         f'{{"name": "search", "arguments": {SJ}}}', "", [("get_weather", W), ("search", S)]),
        (f'Sure — calling it.<|python_tag|>{{"name": "search", "parameters": {SJ}}}',
         "Sure — calling it.", [("search", S)]),
        ('  {"name": "get_time", "parameters": {}} then text', " then text", [("get_time", {})]),
    ],
    "mistral": [
        ("No calls [here] at all.", "No calls [here] at all.", []),
        (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WJ}}}]', "", [("get_weather", W)]),
        (f'Checking ✓ [TOOL_CALLS] [{{"name": "get_weather", "arguments": {WJ}}}, '
         f'{{"name": "search", "arguments": {SJ}}}] after', "Checking ✓  after",
         [("get_weather", W), ("search", S)]),
        ('[TOOL_CALLS]{"name": "get_time", "arguments": {}}', "", [("get_time", {})]),
        (f'Newer layout:[TOOL_CALLS]get_weather[ARGS]{WJ}[TOOL_CALLS]search[ARGS] {SJ} end',
         "Newer layout: end", [("get_weather", W), ("search", S)]),
        (f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WJ}}}, {{"name": "nope", "arguments": {{}}}}]',
         '{"name": "nope", "arguments": {}}]', [("get_weather", W)]),
    ],
    "deepseekv3": [
        ("Just text <｜tool", "Just text <｜tool", []),
        (DS_CALLS + ds_call("get_weather", WJ) + DS_END, "", [("get_weather", W)]),
        ("Let me look that up.\n" + DS_CALLS + ds_call("get_weather", WJ) + "\n"
         + ds_call("search", SJ) + DS_END + "tail",
         "Let me look that up.\ntail", [("get_weather", W), ("search", S)]),
        (DS_CALLS + ds_call("get_time", "{}") + DS_END, "", [("get_time", {})]),
    ],
    "pythonic": [
        ("A list [1, 2] and [note] text.", "A list [1, 2] and [note] text.", []),
        ('[get_weather(city="Zürich", unit="celsius")]', "", [("get_weather", W)]),
        ('I will call: [get_weather(city="Zürich", unit=\'celsius\'), '
         'search(query="naïve \\"quotes\\" 日本 \\\\ end", filters={"years": [2020, 2021], '
         '"tags": {"a": None, "b": true}}, limit=5.5)] ok',
         "I will call:  ok", [("get_weather", W), ("search", S)]),
        ("[get_time()]\n[get_time( )]", "\n", [("get_time", {}), ("get_time", {})]),
        ('[search(query="""line one\nline "two" \'\'\n""", limit=2, filters={"q": \'it\\\'s\'})]', "",
         [("search", {"query": 'line one\nline "two" \'\'\n', "limit": 2, "filters": {"q": "it's"}})]),
    ],
    "json": [
        ("Plain answer, no JSON.", "Plain answer, no JSON.", []),
        (f'{{"name": "get_weather", "arguments": {WJ}}}', "", [("get_weather", W)]),
        (f'  [{{"name": "get_weather", "parameters": {WJ}}}, {{"name": "search", "arguments": {SJ}}}]',
         "", [("get_weather", W), ("search", S)]),
        (f'Here:\n```json\n{{"name": "search", "arguments": {SJ}}}\n```\nBye ✓', "Here:\n\nBye ✓",
         [("search", S)]),
    ],
}
CASES["hermes"] = CASES["qwen25"]

# Outputs that are not valid calls: all of it is normal text, and nothing raises.
MALFORMED = {
    "qwen25": [
        '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call> after',
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"name": 7}\n</tool_call>',
        '<tool_call>\nnot json at all\n</tool_call>',
        'cut short <tool_call>\n{"name": "get_wea',
    ],
    "llama3": [
        '{"foo": 1} is a JSON object',
        '<|python_tag|>{"name": "nope", "parameters": {}}',
        '<|python_tag|>brave_search.call(query="x")',
        '{"name": "get_weather", "parameters": {"city": "x"',
    ],
    "mistral": [
        '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]',
        '[TOOL_CALLS] []',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "x"}',
        '[TOOL_CALLS] [{"name": "get_weather" "arguments": {}}]',
        '[TOOL_CALLS]nope[ARGS]{}',
        '[TOOL_CALLS]get_weather[ARGS][1]',
        '[TOOL_CALLS] hello there',
    ],
    "deepseekv3": [
        DS_CALLS + ds_call("nope", "{}") + DS_END,
        DS_CALLS + ds_call("get_weather", '{"city": oops}') + DS_END,
        DS_CALLS + ds_call("get_weather", "[1, 2]") + DS_END,
        DS_CALLS + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather",
    ],
    "pythonic": [
        "[get_weather(city=some_variable)]",
        "[unknown_tool(a=1)]",
        '[get_weather("positional")]',
        '[get_weather(city="x"',
        "[get_weather(city={1, 2})]",
        "[get_weather(**kw)]",
        '[get_weather(city="multi\nline")]',
    ],
    "json": [
        "[1, 2, 3]",
        '{"name": "nope", "arguments": {}}',
        '```json\n{"name": "get_weather", "arguments": 5}\n```',
        '{"not": "a call"}',
    ],
}
MALFORMED["hermes"] = MALFORMED["qwen25"]
PARSERS = sorted(CASES)


def _calls(items: list[ToolCallItem]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.parameters)) for c in items]


def _random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(len(text) - 1, 40)))) \
        if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _stream(parser_name: str, chunks: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    """Streams chunks, checks the item protocol, returns (normal text, reassembled calls)."""
    normal, calls = _stream_raw(parser_name, chunks)
    return normal, [(name, json.loads(args)) for name, args in calls]


def _stream_raw(parser_name: str, chunks: list[str]) -> tuple[str, list[list[str]]]:
    """(normal text, [[name, concatenated argument deltas]]) of a stream."""
    parser = FunctionCallParser(TOOLS, parser_name)
    normal, calls = [], []
    results = [parser.parse_stream_chunk(c) for c in chunks] + [parser.finish_stream()]
    for text, items in results:
        normal.append(text)
        for item in items:
            if item.name is not None:
                assert item.tool_index == len(calls) and item.parameters == ""
                calls.append([item.name, ""])
            else:
                assert 0 <= item.tool_index < len(calls)
                calls[item.tool_index][1] += item.parameters
    return "".join(normal), calls


def test_every_builtin_parser_is_registered():
    assert set(PARSERS) <= set(registry("tool_call_parsers").names())


def test_unknown_parser_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'.*qwen25"):
        FunctionCallParser(TOOLS, "nope")


def test_malformed_tools_list_is_a_clear_error():
    with pytest.raises(ValueError, match="function.name"):
        FunctionCallParser([{"type": "function", "function": {}}], "qwen25")


@pytest.mark.parametrize("parser_name", PARSERS)
def test_non_stream_parses_hand_written_outputs(parser_name):
    for text, normal, calls in CASES[parser_name]:
        parser = FunctionCallParser(TOOLS, parser_name)
        got_normal, got_calls = parser.parse_non_stream(text)
        assert got_normal == normal, text
        assert _calls(got_calls) == calls, text
        assert [c.tool_index for c in got_calls] == list(range(len(calls)))
        assert parser.has_tool_call(text) == bool(calls)


@pytest.mark.parametrize("parser_name", PARSERS)
def test_streaming_in_random_chunks_matches_non_stream(parser_name):
    rng = random.Random(1234)
    for text, normal, calls in CASES[parser_name]:
        assert _stream(parser_name, list(text)) == (normal, calls), text
        for _ in range(25):
            chunks = _random_chunks(text, rng)
            assert _stream(parser_name, chunks) == (normal, calls), chunks


@pytest.mark.parametrize("parser_name", PARSERS)
def test_malformed_calls_come_back_as_normal_text(parser_name):
    rng = random.Random(99)
    for text in MALFORMED[parser_name]:
        normal, calls = FunctionCallParser(TOOLS, parser_name).parse_non_stream(text)
        assert (normal, calls) == (text, []), text
        for _ in range(10):  # a name streamed before the JSON broke stays sent; the text comes too
            streamed_normal, _ = _stream_raw(parser_name, _random_chunks(text, rng))
            assert streamed_normal == text


def test_argument_deltas_arrive_before_the_call_is_complete():
    parser = FunctionCallParser(TOOLS, "qwen25")
    normal, items = parser.parse_stream_chunk('ok<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert normal == "ok"
    assert items == [ToolCallItem(0, "get_weather", ""), ToolCallItem(0, None, '{"ci')]
    normal, items = parser.parse_stream_chunk('ty": "Oslo"}}\n</tool_call>')
    assert (normal, items) == ("", [ToolCallItem(0, None, 'ty": "Oslo"}')])


def test_a_possible_marker_start_is_held_until_decided():
    parser = FunctionCallParser(TOOLS, "qwen25")
    assert parser.parse_stream_chunk("a <tool_") == ("a ", [])
    assert parser.parse_stream_chunk("box> b") == ("<tool_box> b", [])


def test_calls_to_tools_outside_the_request_are_text():
    parser = FunctionCallParser(TOOLS[:1], "llama3")
    text = '{"name": "search", "parameters": {}}'
    assert parser.parse_non_stream(text) == (text, [])


@pytest.mark.parametrize("parser_name", [p for p in PARSERS if p != "pythonic"])
def test_structure_info_wraps_arguments_into_a_parsable_call(parser_name):
    parser = FunctionCallParser(TOOLS, parser_name)
    info = parser.structure_info("search")
    assert info.begin.startswith(info.trigger)
    text = "Before " + info.begin + SJ + info.end if parser_name != "json" else info.begin + SJ + info.end
    _, calls = parser.parse_non_stream(text)
    assert _calls(calls) == [("search", S)]


def test_pythonic_has_no_json_structure():
    assert FunctionCallParser(TOOLS, "pythonic").structure_info("search") is None


LONG = {"query": 'def f(x):\n    return "a\\\\b" + x  # [brackets] {braces} \'quote\'\n' * 60, "limit": 1}
LONG_OUTPUTS = {
    "qwen25": f'Writing.<tool_call>\n{{"name": "search", "arguments": {json.dumps(LONG)}}}\n</tool_call>',
    "deepseekv3": "Writing." + DS_CALLS + ds_call("search", json.dumps(LONG)) + DS_END,
    "mistral": f"Writing.[TOOL_CALLS]search[ARGS]{json.dumps(LONG)}",
    "pythonic": f"Writing.[search(query={LONG['query']!r}, limit=1)]",
}


@pytest.mark.parametrize("parser_name", sorted(LONG_OUTPUTS))
def test_long_arguments_stream_in_small_chunks(parser_name):
    """Scanners resume across chunks; the result must not depend on where chunks end."""
    text = LONG_OUTPUTS[parser_name]
    rng = random.Random(5)
    for size in (1, 3, 7):
        chunks, pos = [], 0
        while pos < len(text):
            step = rng.randint(1, size)
            chunks.append(text[pos:pos + step])
            pos += step
        assert _stream(parser_name, chunks) == ("Writing.", [("search", LONG)])
