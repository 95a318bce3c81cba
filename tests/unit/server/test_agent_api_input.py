"""Responses items and Anthropic blocks -> chat messages; output blocks of a turn, streamed
and whole."""
import pytest

from kvyard.errors import RequestError
from kvyard.server.anthropic_input import chat_messages, chat_tool_choice, thinking_budget
from kvyard.server.anthropic_protocol import AnthropicMessage, ThinkingConfig, ToolChoice
from kvyard.server.output_blocks import BlockAssembler, blocks_of
from kvyard.server.responses_input import input_messages

CALL = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a": 1}'}


def test_responses_items_become_chat_turns():
    items = [{"role": "developer", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"type": "reasoning", "summary": []}, CALL,
             {"type": "function_call_output", "call_id": "call_1", "output": "42"}]
    assert input_messages(items, []) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    history = input_messages([CALL], [])
    assert input_messages([{"type": "function_call_output", "call_id": "call_1", "output": "x"}], history)


@pytest.mark.parametrize("items, param", [
    ([{"type": "file_search_call", "id": "x"}], "input.0.type"),
    ([{"type": "function_call_output", "call_id": "nope", "output": "x"}], "input.0.call_id"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input.0.content.0.type"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input.0.call_id"),
    ([{"role": "robot", "content": "x"}], "input.0.role"),
])
def test_bad_responses_items_name_the_field(items, param):
    with pytest.raises(RequestError) as err:
        input_messages(items, [])
    assert err.value.param == param and err.value.message.startswith(param + ":")


def test_anthropic_blocks_become_chat_turns():
    messages = [AnthropicMessage(role="user", content="weather?"),
                AnthropicMessage(role="assistant", content=[
                    {"type": "thinking", "thinking": "use the tool", "signature": ""},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Oslo"}}]),
                AnthropicMessage(role="user", content=[
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "rain"}]},
                    {"type": "text", "text": "and tomorrow?"}])]
    assert chat_messages(messages) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "use the tool", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {"role": "user", "content": "and tomorrow?"}]


def test_bad_anthropic_input_names_the_field():
    with pytest.raises(RequestError) as err:
        chat_messages([AnthropicMessage(role="user", content=[{"type": "tool_result", "tool_use_id": "x"}])])
    assert err.value.param == "messages.0.content.0.tool_use_id"
    with pytest.raises(RequestError) as err:
        chat_tool_choice(ToolChoice(type="tool"), has_tools=True)
    assert err.value.param == "tool_choice.name"
    with pytest.raises(RequestError) as err:
        thinking_budget(ThinkingConfig(type="enabled", budget_tokens=100), max_tokens=50)
    assert err.value.param == "thinking.budget_tokens"
    assert chat_tool_choice(ToolChoice(type="any"), has_tools=True) == "required"


def test_streamed_blocks_equal_the_whole_turn():
    deltas = [{"reasoning_content": "think "}, {"reasoning_content": "more"}, {"content": "\n"},
              {"content": "Answer"}, {"content": " text"},
              {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
              {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
              {"content": "\n"}]
    assembler, events = BlockAssembler(), []
    for d in deltas:
        events += assembler.feed(d)
    events += assembler.finish()
    message = {"reasoning_content": "think more", "content": "\nAnswer text",
               "tool_calls": [{"id": "call_a", "function": {"name": "f", "arguments": '{"x": 1}'}},
                              {"id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}
    whole = blocks_of(message)
    assert [(b.kind, b.text, b.name) for b in assembler.blocks] == [(b.kind, b.text, b.name) for b in whole]
    ops = [(e.op, e.block.index) for e in events if e.op != "delta"]
    assert ops == [("open", 0), ("close", 0), ("open", 1), ("close", 1), ("open", 2), ("close", 2),
                   ("open", 3), ("close", 3)]  # one block open at a time, in order
