"""tool_call_constraint schemas (checked with jsonschema) and parse_constrained_tool_calls."""
import json

import jsonschema
import pytest

from kvyard.parsers import ToolCallItem
from kvyard.grammar.tool_constraints import parse_constrained_tool_calls, tool_call_constraint

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "days": {"type": "integer"}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add_point",
        "parameters": {"type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}},
                       "required": ["p"],
                       "$defs": {"Point": {"type": "object", "required": ["x", "y"],
                                           "properties": {"x": {"type": "number"},
                                                          "y": {"type": "number"}}}}}}},
    {"type": "function", "function": {"name": "ping"}},
]
WEATHER = {"name": "get_weather", "parameters": {"city": "Zürich", "days": 3}}
POINT = {"name": "add_point", "parameters": {"p": {"x": 1, "y": 2.5}}}
PING = {"name": "ping", "parameters": {}}


def _schema(tool_choice):
    kind, spec = tool_call_constraint(TOOLS, tool_choice, "qwen25")
    assert kind == "json_schema"
    schema = json.loads(spec)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_auto_and_none_constrain_nothing(choice):
    assert tool_call_constraint(TOOLS, choice, "qwen25") is None


def test_required_accepts_one_or_more_valid_calls():
    validator = _schema("required")
    for good in ([WEATHER], [POINT], [PING], [WEATHER, POINT, PING]):
        assert validator.is_valid(good), good


@pytest.mark.parametrize("bad", [
    [],
    {"name": "get_weather", "parameters": {"city": "x"}},
    [{"name": "nope", "parameters": {}}],
    [{"name": "get_weather", "parameters": {"days": 3}}],            # city is required
    [{"name": "get_weather", "parameters": {"city": "x", "extra": 1}}],
    [{"name": "get_weather", "parameters": {"city": 5}}],
    [{"name": "add_point", "parameters": {"p": {"x": 1}}}],          # through the hoisted $ref
    [{"name": "ping", "parameters": {}, "id": 1}],
    [{"parameters": {}}],
])
def test_required_rejects_invalid_calls(bad):
    assert not _schema("required").is_valid(bad)


def test_named_function_allows_exactly_one_call_of_it():
    validator = _schema({"type": "function", "function": {"name": "add_point"}})
    assert validator.is_valid([POINT])
    assert not validator.is_valid([WEATHER])
    assert not validator.is_valid([POINT, POINT])
    assert not validator.is_valid([])


def test_bad_tool_choice_is_a_clear_error():
    with pytest.raises(ValueError, match="'missing', which is not in tools"):
        tool_call_constraint(TOOLS, {"type": "function", "function": {"name": "missing"}}, "qwen25")
    with pytest.raises(ValueError, match="tool_choice must be"):
        tool_call_constraint(TOOLS, "always", "qwen25")
    with pytest.raises(ValueError, match="non-empty tools"):
        tool_call_constraint([], "required", "qwen25")


def test_schema_compiles_in_xgrammar():
    xgrammar = pytest.importorskip("xgrammar")
    _, spec = tool_call_constraint(TOOLS, "required", "qwen25")
    assert xgrammar.Grammar.from_json_schema(spec) is not None


def test_constrained_output_parses_back_into_calls():
    text = json.dumps([WEATHER, PING], ensure_ascii=False)
    assert parse_constrained_tool_calls(text, TOOLS) == [
        ToolCallItem(0, "get_weather", '{"city": "Zürich", "days": 3}'),
        ToolCallItem(1, "ping", "{}"),
    ]


@pytest.mark.parametrize("bad", ['[{"name": "get_weather", "parameters": {"ci', "[]",
                                 '[{"name": "nope", "parameters": {}}]',
                                 '[{"name": "ping", "parameters": [1]}]'])
def test_constrained_output_that_is_not_calls_is_a_value_error(bad):
    with pytest.raises(ValueError):
        parse_constrained_tool_calls(bad, TOOLS)
