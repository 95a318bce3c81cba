"""The Responses API and the Anthropic Messages API through the official openai and anthropic
SDKs, against the real SmolLM2 `kvyard serve` (greedy): text, streaming, forced tool calls whose
arguments match the schema, json_schema output, multi-turn conversations, errors, cache reports."""
from __future__ import annotations

import json

import anthropic
import pytest
import requests
from openai import BadRequestError, NotFoundError

from conftest import API_KEY, SERVED_NAME

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                  "additionalProperties": False}
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
                    "parameters": WEATHER_SCHEMA}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER_SCHEMA}]
GREEDY = {"temperature": 0}
ANY_ONE = {"type": "any", "disable_parallel_tool_use": True}  # exactly one call
PROMPT = "What is the capital of France? Answer in one short sentence."


@pytest.fixture(scope="module")
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=300)


def _matches_weather_schema(arguments: dict) -> None:
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and arguments["city"]


# -- Responses API -----------------------------------------------------------------------------
def test_responses_plain_and_stream_agree(client):
    kwargs = dict(model=SERVED_NAME, input=PROMPT, max_output_tokens=60, **GREEDY)
    r = client.responses.create(**kwargs)
    assert r.object == "response" and r.status == "completed" and r.model == SERVED_NAME
    assert "Paris" in r.output_text and r.output[0].type == "message"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    deltas, kinds = [], []
    with client.responses.stream(**kwargs) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == r.output_text == final.output_text
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert {"response.output_item.added", "response.content_part.added", "response.output_text.done",
            "response.output_item.done"} <= set(kinds)
    # the same prompt again: its prefix is served from the radix cache, and usage says so
    assert client.responses.create(**kwargs).usage.input_tokens_details.cached_tokens > 0


def test_responses_forced_function_call_streams_its_arguments(client):
    kwargs = dict(model=SERVED_NAME, input="What's the weather like in Paris?", tools=RESPONSES_TOOLS,
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, **GREEDY)
    r = client.responses.create(**kwargs)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    _matches_weather_schema(json.loads(calls[0].arguments))
    deltas = []
    with client.responses.stream(**kwargs) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == calls[0].arguments == final.output[-1].arguments
    required = client.responses.create(**{**kwargs, "tool_choice": "required", "parallel_tool_calls": False})
    _matches_weather_schema(json.loads([o for o in required.output if o.type == "function_call"][0].arguments))


@pytest.mark.slow
def test_responses_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=SERVED_NAME, input="Invent a person.", max_output_tokens=60,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema}}, **GREEDY)
    person = json.loads(r.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and isinstance(person["name"], str)


@pytest.mark.slow
def test_responses_previous_response_id_and_function_call_output(client):
    first = client.responses.create(model=SERVED_NAME, input="What's the weather like in Paris?",
                                    tools=RESPONSES_TOOLS, tool_choice="required", parallel_tool_calls=False,
                                    max_output_tokens=60, **GREEDY)
    call = [o for o in first.output if o.type == "function_call"][0]
    assert client.responses.retrieve(first.id).output[-1].call_id == call.call_id
    second = client.responses.create(model=SERVED_NAME, previous_response_id=first.id, tools=RESPONSES_TOOLS,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny and 31 degrees Celsius"}],
                                     max_output_tokens=60, **GREEDY)
    assert second.previous_response_id == first.id and second.output_text
    # the stored conversation is the prompt: the earlier turn is a cached prefix and is longer
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    # the same turn sent as explicit items gives the same answer
    items = [{"role": "user", "content": "What's the weather like in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny and 31 degrees Celsius"}]
    explicit = client.responses.create(model=SERVED_NAME, input=items, tools=RESPONSES_TOOLS,
                                       max_output_tokens=60, **GREEDY)
    assert explicit.output_text == second.output_text
    client.responses.delete(first.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(first.id)


def test_responses_bad_input_names_the_field(client):
    with pytest.raises(BadRequestError) as err:
        client.responses.create(model=SERVED_NAME, input=[{"type": "computer_call", "id": "x"}])
    assert err.value.body["param"] == "input.0.type" and "computer_call" in err.value.body["message"]
    with pytest.raises(BadRequestError) as err:
        client.responses.create(model=SERVED_NAME, input=[{"type": "function_call_output", "call_id": "nope",
                                                           "output": "x"}])
    assert err.value.body["param"] == "input.0.call_id"
    with pytest.raises(NotFoundError) as err:
        client.responses.create(model=SERVED_NAME, input="hi", previous_response_id="resp_unknown")
    assert err.value.body["param"] == "previous_response_id"


# -- Anthropic Messages API --------------------------------------------------------------------
@pytest.mark.slow
def test_messages_plain_and_stream_agree(claude):
    kwargs = dict(model=SERVED_NAME, max_tokens=60, messages=[{"role": "user", "content": PROMPT}],
                  system="You are a concise assistant.", extra_body=GREEDY)
    m = claude.messages.create(**kwargs)
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
    assert "Paris" in m.content[0].text and m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens > 0 and m.usage.output_tokens > 0
    with claude.messages.stream(**kwargs) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == m.content[0].text == final.content[0].text
    assert final.stop_reason == m.stop_reason and final.usage.output_tokens == m.usage.output_tokens
    # the repeated prompt is read from the prefix cache
    assert final.usage.cache_read_input_tokens > 0


@pytest.mark.slow
def test_messages_stop_sequence(claude):
    m = claude.messages.create(model=SERVED_NAME, max_tokens=60, stop_sequences=["Paris"],
                               messages=[{"role": "user", "content": PROMPT}], extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "Paris"
    assert "Paris" not in m.content[0].text


def test_messages_tool_use_any_then_tool_result(claude):
    question = {"role": "user", "content": "What's the weather like in Paris?"}
    m = claude.messages.create(model=SERVED_NAME, max_tokens=60, tools=ANTHROPIC_TOOLS, tool_choice=ANY_ONE,
                               messages=[question], extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    _matches_weather_schema(uses[0].input)
    with claude.messages.stream(model=SERVED_NAME, max_tokens=60, tools=ANTHROPIC_TOOLS, tool_choice=ANY_ONE,
                                messages=[question], extra_body=GREEDY) as stream:
        partial = "".join(e.delta.partial_json for e in stream
                          if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
        final = stream.get_final_message()
    assert json.loads(partial) == uses[0].input == final.content[0].input
    reply = claude.messages.create(
        model=SERVED_NAME, max_tokens=40, tools=ANTHROPIC_TOOLS, extra_body=GREEDY,
        messages=[question, {"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                "content": "Sunny and 31 degrees Celsius"}]}])
    assert reply.content and reply.content[0].type == "text" and reply.content[0].text
    assert reply.usage.cache_read_input_tokens > 0  # the first turn's prompt is a cached prefix


@pytest.mark.slow
def test_messages_count_tokens_matches_the_prompt(claude):
    messages = [{"role": "user", "content": PROMPT}]
    counted = claude.messages.count_tokens(model=SERVED_NAME, messages=messages).input_tokens
    m = claude.messages.create(model=SERVED_NAME, max_tokens=2, messages=messages, extra_body=GREEDY)
    assert counted == m.usage.input_tokens + m.usage.cache_read_input_tokens > 0
    with_tools = claude.messages.count_tokens(model=SERVED_NAME, messages=messages, tools=ANTHROPIC_TOOLS,
                                              system="Be brief.").input_tokens
    m = claude.messages.create(model=SERVED_NAME, max_tokens=2, messages=messages, tools=ANTHROPIC_TOOLS,
                               system="Be brief.", extra_body=GREEDY)
    assert with_tools == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_messages_errors_are_anthropic_shaped(base_url, claude):
    url, headers = base_url + "/v1/messages", {"x-api-key": API_KEY}
    r = requests.post(url, headers=headers, json={"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=SERVED_NAME, max_tokens=5, messages=[
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}])
    assert err.value.body["error"]["message"].startswith("messages.0.content.0.tool_use_id:")
    r = requests.post(url, headers={"x-api-key": "wrong"}, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# -- thinking budget (native API: SmolLM2 has no thinking template, so the markers are given) ---
def test_thinking_budget_forces_the_end_marker(base_url, auth):
    params = {"max_new_tokens": 8, "temperature": 0}
    body = {"text": "Once upon a time", "sampling_params": params}
    free = requests.post(base_url + "/generate", headers=auth, json=body).json()["output_ids"]
    budget = {**params, "thinking_budget": 3, "thinking_start_ids": [], "thinking_end_ids": [100, 200]}
    cut = requests.post(base_url + "/generate", headers=auth, json={**body, "sampling_params": budget}).json()
    assert cut["output_ids"][:5] == free[:3] + [100, 200]
