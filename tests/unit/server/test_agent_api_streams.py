"""The Responses and Messages stream renderers, fed a fake engine stream of a reasoning model's
output (thinking, answer, then a tool call) and checked by the official SDKs: every event
validates as the SDK's own event type, and the SDK's accumulators rebuild the same turn."""
import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import TypeAdapter

from kvyard.server import anthropic_api, responses_api
from kvyard.server.anthropic_protocol import MessagesRequest
from kvyard.server.context import ServerContext
from kvyard.server.openai_chat import ChatPlan
from kvyard.server.responses_protocol import ResponsesRequest
from kvyard.server.running import Chunk

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
OUTPUT = ['Let me', ' think.</th', 'ink>\n\nIt is', ' sunny.<tool_', 'call>\n{"name": "get_weather", ',
          '"arguments": {"city":', ' "Oslo"}}\n</tool_call>']
META = {"prompt_tokens": 12, "completion_tokens": 9, "cached_tokens": 4, "finish_reason": {"type": "stop"}}


def _ctx():
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: text.split())
    args = SimpleNamespace(served_model_name="m", reasoning_parser="deepseek-r1", tool_call_parser="qwen25")
    return ServerContext(args=args, engine=SimpleNamespace(args=args), tm=SimpleNamespace(tokenizer=tokenizer))


def _plan():
    return ChatPlan(id="x", created=0, n=1, logprobs=False, tools=TOOLS, tool_call_parser="qwen25",
                    forced_tools=False, reasoning_parser="deepseek-r1", stream_reasoning=True)


async def _fake_chunks(tm, reqs):
    for i, text in enumerate(OUTPUT):
        last = i == len(OUTPUT) - 1
        meta = META if last else {**META, "finish_reason": None}
        yield Chunk(0, text, [], [], [], {"text": "", "output_ids": [], "meta_info": meta}, finished=last)


def _events(stream) -> list[dict]:
    async def collect():
        return [line async for line in stream]
    out = []
    for raw in asyncio.run(collect()):
        kind, data = raw.strip().split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        out.append(json.loads(data[len("data: "):]))
        assert out[-1]["type"] == kind[len("event: "):]
    return out


def _by_type(union) -> dict:
    """{event type: its SDK model} of a union of event models."""
    import typing

    members = typing.get_args(typing.get_args(union)[0]) if typing.get_origin(union) is typing.Annotated \
        else typing.get_args(union)
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


def test_responses_stream_is_valid_for_the_openai_sdk(monkeypatch):
    from openai.types.responses import ResponseStreamEvent

    monkeypatch.setattr(responses_api, "stream_chunks", _fake_chunks)
    req = ResponsesRequest(input="weather?", stream=True)
    plan = responses_api.ResponsePlan(req, "resp_1", 0, [], [{"role": "user", "content": "weather?"}])
    ctx = _ctx()
    events = _events(responses_api._stream(ctx, plan, [], _plan()))
    models = _by_type(ResponseStreamEvent)
    parsed = [models[e["type"]].model_validate(e) for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = parsed[-1].response
    assert parsed[-1].type == "response.completed" and final.usage.input_tokens_details.cached_tokens == 4
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].content[0].text == "Let me think."
    assert "".join(e.delta for e in parsed if e.type == "response.reasoning_text.delta") == "Let me think."
    assert "".join(e.delta for e in parsed if e.type == "response.output_text.delta") == final.output_text == "It is sunny."
    args = "".join(e.delta for e in parsed if e.type == "response.function_call_arguments.delta")
    assert args == final.output[2].arguments == '{"city": "Oslo"}'
    assert ctx.responses.get("resp_1").messages[-1]["tool_calls"][0]["function"]["arguments"] == args


def test_messages_stream_is_valid_for_the_anthropic_sdk(monkeypatch):
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent

    monkeypatch.setattr(anthropic_api, "stream_chunks", _fake_chunks)
    req = MessagesRequest(max_tokens=50, messages=[{"role": "user", "content": "weather?"}], stream=True)
    events = _events(anthropic_api._stream(_ctx(), req, [], _plan(), "msg_1"))
    adapter = TypeAdapter(RawMessageStreamEvent)
    snapshot, bufs = None, {}
    for e in events:
        snapshot = accumulate_event(event=adapter.validate_python(e), current_snapshot=snapshot, json_bufs=bufs)
    assert [b.type for b in snapshot.content] == ["thinking", "text", "tool_use"]
    assert snapshot.content[0].thinking == "Let me think." and snapshot.content[1].text == "It is sunny."
    assert snapshot.content[2].input == {"city": "Oslo"} and snapshot.stop_reason == "tool_use"
    assert snapshot.usage.cache_read_input_tokens == 4 and snapshot.usage.input_tokens == 8
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
