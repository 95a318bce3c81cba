"""The OpenAI server's structured output and forced tool calls, without a model: request fields ->
the grammar field of the prepared requests' SamplingParams, the 400s naming the field, and the
forced tool calls read back from constrained output (whole and streamed).

A real TokenizerManager (never started: prepare needs no scheduler) with a tiny tokenizer and
the real xgrammar checker, so bad grammars carry the compiler's own message.
"""
from __future__ import annotations

import json
import random
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from kvyard.errors import RequestError
from kvyard.grammar.manager import GrammarChecker
from kvyard.server.context import ServerContext
from kvyard.server.openai_chat import ChoiceStreamParser, chat_choice, prepare_chat
from kvyard.server.openai_completions import prepare_completion
from kvyard.server.openai_params import JSON_OBJECT_SCHEMA, response_format_constraint
from kvyard.server.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from kvyard.frontend.tokenizer_manager import TokenizerManager
from kvyard.grammar.tool_constraints import ConstrainedToolCallStream, parse_constrained_tool_calls
from tiny_tokenizer import build_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "ping"}},
]
CHAT = [{"role": "user", "content": "ab12"}]


@pytest.fixture(scope="module")
def ctx():
    tokenizer = build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    vocab = len(tokenizer)
    tm = TokenizerManager(tokenizer, {"context_length": 256, "vocab_size": vocab}, "inproc://a", "inproc://b",
                          lambda: True, grammar_checker=GrammarChecker("xgrammar", vocab))
    args = SimpleNamespace(tool_call_parser=None, reasoning_parser=None, enable_cache_report=False)
    return ServerContext(args=args, engine=SimpleNamespace(args=args), tm=tm)


def chat(ctx, **fields):
    return prepare_chat(ctx, ChatCompletionRequest(messages=CHAT, max_tokens=8, **fields))


def completion(ctx, **fields):
    return prepare_completion(ctx, CompletionRequest(prompt="ab12", max_tokens=8, **fields))


def grammar_of(reqs) -> dict:
    params = reqs[0].sampling_params
    return {k: getattr(params, k) for k in ("json_schema", "regex", "ebnf", "structural_tag")
            if getattr(params, k) is not None}


@contextmanager
def raises_400(param: str, *words: str):
    """A RequestError with status 400 that names ``param`` first in its message and contains ``words``."""
    with pytest.raises(RequestError) as info:
        yield
    error = info.value
    assert (error.status, error.param) == (400, param), (error.status, error.param, error.message)
    assert error.message.startswith(param), error.message
    for word in words:
        assert word in error.message, error.message


# -- response_format -------------------------------------------------------------------------
def test_response_format_translations():
    assert response_format_constraint(None) is None
    assert response_format_constraint(ResponseFormat(type="text")) is None
    c = response_format_constraint(ResponseFormat(type="json_object"))
    assert (c.kind, c.spec, c.param) == ("json_schema", JSON_OBJECT_SCHEMA, "response_format")
    fmt = ResponseFormat.model_validate({"type": "json_schema",
                                         "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    c = response_format_constraint(fmt)
    assert c.kind == "json_schema" and json.loads(c.spec) == SCHEMA
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}}
    c = response_format_constraint(ResponseFormat.model_validate(tag))
    assert c.kind == "structural_tag" and json.loads(c.spec) == tag


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema"),
])
def test_response_format_json_schema_without_schema_is_400(fmt, param):
    with raises_400(param, "required"):
        response_format_constraint(ResponseFormat.model_validate(fmt))


def test_response_format_reaches_the_sampling_params(ctx):
    assert grammar_of(chat(ctx, response_format={"type": "text"})[0]) == {}
    assert grammar_of(chat(ctx, response_format={"type": "json_object"})[0]) == {"json_schema": JSON_OBJECT_SCHEMA}
    reqs, _ = chat(ctx, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
    assert json.loads(grammar_of(reqs)["json_schema"]) == SCHEMA
    reqs, _ = completion(ctx, response_format={"type": "json_object"}, n=3)
    assert len(reqs) == 3 and all(grammar_of([r]) == {"json_schema": JSON_OBJECT_SCHEMA} for r in reqs)


# -- extra_body regex / ebnf / json_schema -----------------------------------------------------
@pytest.mark.parametrize("prepare", [chat, completion])
@pytest.mark.parametrize("field, value, expected", [
    ("regex", "[ab]+", "[ab]+"),
    ("ebnf", 'root ::= "a" | "b"', 'root ::= "a" | "b"'),
    ("json_schema", SCHEMA, json.dumps(SCHEMA)),
    ("json_schema", json.dumps(SCHEMA), json.dumps(SCHEMA)),
])
def test_extra_body_fields_reach_the_sampling_params(ctx, prepare, field, value, expected):
    reqs, _ = prepare(ctx, **{field: value})
    assert grammar_of(reqs) == {field: expected}


@pytest.mark.parametrize("fields, names", [
    ({"regex": "a", "ebnf": 'root ::= "a"'}, "regex, ebnf"),
    ({"response_format": {"type": "json_object"}, "json_schema": SCHEMA}, "response_format, json_schema"),
    ({"regex": "a", "ebnf": 'root ::= "a"', "json_schema": SCHEMA}, "regex, ebnf, json_schema"),
])
@pytest.mark.parametrize("prepare", [chat, completion])
def test_two_constraints_at_once_are_400_naming_them(ctx, prepare, fields, names):
    with raises_400(names.split(", ")[-1], f"got {names}"):
        prepare(ctx, **fields)


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", 'Unsupported type "objekt"'),
    ({"json_schema": '{"type": "objekt"}'}, "json_schema", 'Unsupported type "objekt"'),
    ({"json_schema": "{not json"}, "json_schema", "Failed to parse JSON"),
    ({"regex": "[0-9"}, "regex", "Unclosed '['"),
    ({"ebnf": "root ::= missing"}, "ebnf", 'Rule "missing" is not defined'),
    ({"response_format": {"type": "structural_tag", "structures": []}}, "response_format", "format"),
])
@pytest.mark.parametrize("prepare", [chat, completion])
def test_bad_grammars_are_400_with_the_compilers_message(ctx, prepare, fields, param, words):
    with raises_400(param, words):
        prepare(ctx, **fields)


# -- forced tool calls: the request ------------------------------------------------------------
def test_required_and_named_tool_choice_constrain_the_output(ctx):
    reqs, plan = chat(ctx, tools=TOOLS, tool_choice="required", n=2)
    schema = json.loads(grammar_of(reqs)["json_schema"])
    assert plan.forced_tools and plan.tool_call_parser is None and len(reqs) == 2
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]] == [["get_weather"], ["ping"]]
    reqs, _ = chat(ctx, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert json.loads(grammar_of(reqs)["json_schema"])["maxItems"] == 1
    reqs, _ = chat(ctx, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    schema = json.loads(grammar_of(reqs)["json_schema"])
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"]["enum"] == ["ping"]
    for choice in ("auto", "none", None):
        reqs, plan = chat(ctx, tools=TOOLS, tool_choice=choice)
        assert grammar_of(reqs) == {} and not plan.forced_tools


@pytest.mark.parametrize("fields, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "non-empty tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "ping"}}}, "tool_choice", "non-empty tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not in tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "got response_format, tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "regex": "a"}, "tool_choice", "got regex, tool_choice"),
])
def test_forced_tool_choice_errors(ctx, fields, param, words):
    with raises_400(param, words):
        chat(ctx, **fields)


def test_auto_tool_choice_may_combine_with_response_format(ctx):
    reqs, plan = chat(ctx, tools=TOOLS, tool_choice="auto", response_format={"type": "json_object"})
    assert grammar_of(reqs) == {"json_schema": JSON_OBJECT_SCHEMA} and not plan.forced_tools


# -- forced tool calls: the response -------------------------------------------------------------
def output(text: str, finish: str = "stop") -> dict:
    return {"text": text, "output_ids": [], "meta_info": {"finish_reason": {"type": finish},
                                                          "prompt_tokens": 3, "completion_tokens": 5}}


CALLS = '[{"name": "get_weather", "parameters": {"city": "Paris \\"15e\\""}}, {"name": "ping", "parameters": {}}]'


def test_forced_choice_has_openai_tool_calls_per_choice(ctx):
    _, plan = chat(ctx, tools=TOOLS, tool_choice="required", n=2)
    first = chat_choice(plan, 0, output(CALLS))
    second = chat_choice(plan, 1, output('[{"name": "ping", "parameters": {}}]'))
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
    calls = first["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "ping"]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'Paris "15e"'}
    assert [c["function"]["name"] for c in second["message"]["tool_calls"]] == ["ping"]
    assert second["index"] == 1


def test_forced_choice_cut_short_keeps_the_text(ctx):
    _, plan = chat(ctx, tools=TOOLS, tool_choice="required")
    cut = chat_choice(plan, 0, output(CALLS[:30], finish="length"))
    assert cut["finish_reason"] == "length" and cut["message"]["content"] == CALLS[:30]
    assert "tool_calls" not in cut["message"]


def split_randomly(text: str, seed: int) -> list[str]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        pieces.append(text[i:i + k])
        i += k
    return pieces


@pytest.mark.parametrize("seed", range(5))
def test_forced_stream_deltas_are_openai_shaped_and_reassemble(ctx, seed):
    _, plan = chat(ctx, tools=TOOLS, tool_choice="required", stream=True)
    parser = ChoiceStreamParser(plan)
    pieces = split_randomly(CALLS, seed)
    deltas = [parser.delta(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert all("content" not in d for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] not in calls:  # the first delta of a call names it
                assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert "id" not in tc and "name" not in tc["function"]
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert parser.saw_calls and sorted(calls) == [0, 1]
    whole = parse_constrained_tool_calls(CALLS, TOOLS)
    assert [c["name"] for c in calls.values()] == [c.name for c in whole]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [json.loads(c.parameters) for c in whole]


def test_stream_reader_holds_arguments_until_the_name():
    reader = ConstrainedToolCallStream()
    items = reader.feed('[{"parameters": {"x": [1, "}"]}, ')
    assert items == []
    items = reader.feed('"name": "ping"}]')
    assert [(i.tool_index, i.name) for i in items] == [(0, "ping"), (0, None)]
    assert json.loads(items[1].parameters) == {"x": [1, "}"]}


def test_stream_reader_emits_nothing_for_other_text():
    reader = ConstrainedToolCallStream()
    assert reader.feed("Sure, I will call a tool: {\"name\": \"ping\"}") == []
