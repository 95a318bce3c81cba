"""POST /v1/responses (OpenAI Responses API), GET and DELETE /v1/responses/{id}.

A request becomes a chat request (responses_input) and runs on the chat pipeline: chat
template, tool-call and reasoning parsers, grammar-forced tool_choice and text.format. Its chat
choice becomes output items (output_blocks): reasoning, message, function_call. ``store`` keeps
the response and its conversation in a bounded in-memory ResponseStore, which
``previous_response_id`` continues (instructions are not carried over, as in the API).

Streaming sends the Responses events (``event: <type>`` + JSON with a sequence_number):
response.created, response.in_progress, then per item response.output_item.added, its deltas
(response.output_text.delta, response.reasoning_text.delta, response.function_call_arguments.delta)
and .done events, and response.completed (response.incomplete when cut by max_output_tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Request

from kvyard.errors import RequestError
from kvyard.server.context import ServerContext, ctx_of
from kvyard.server.errors import renamed
from kvyard.server.openai_chat import ChoiceStreamParser, chat_choice, prepare_chat
from kvyard.server.openai_format import finish_reason_of, new_id, now
from kvyard.server.output_blocks import REASONING, TEXT, Block, BlockAssembler, BlockEvent, blocks_of
from kvyard.server.protocol import ChatCompletionRequest
from kvyard.server.reasoning_budget import effort_budget
from kvyard.server.responses_input import (chat_response_format, chat_tool_choice, chat_tools,
                                           input_messages)
from kvyard.server.responses_protocol import ResponsesRequest
from kvyard.server.responses_store import ResponseStore, StoredResponse
from kvyard.server.running import check_not_aborted, run_to_completion, stream_chunks
from kvyard.server.streaming import EventStream
from kvyard.server.response_models import Deleted, ResponseObject, ok

router = APIRouter()
# chat field -> the Responses field it came from, for errors raised by the chat pipeline
_FIELD_NAMES = {"response_format.json_schema.schema": "text.format.schema", "response_format": "text.format",
                "max_completion_tokens": "max_output_tokens", "messages": "input", "reasoning_effort": "reasoning.effort"}


@dataclass
class ResponsePlan:
    req: ResponsesRequest
    id: str
    created: int
    history: list[dict]        # the conversation before this input (chat messages)
    messages: list[dict]       # this input's chat messages


def _store(ctx: ServerContext) -> ResponseStore:
    if ctx.responses is None:
        ctx.responses = ResponseStore()
    return ctx.responses


@router.post("/v1/responses", responses=ok(ResponseObject))
async def create_response(req: ResponsesRequest, request: Request):
    ctx = ctx_of(request)
    plan, reqs, chat_plan = _prepare(ctx, req)
    if req.stream:
        return EventStream(_stream(ctx, plan, reqs, chat_plan))
    outs = await run_to_completion(ctx.tm, reqs, request)
    message = chat_choice(chat_plan, 0, outs[0])
    blocks = blocks_of(message["message"])
    return _finish(ctx, plan, blocks, message["finish_reason"], outs[0])


@router.get("/v1/responses/{response_id}", responses=ok(ResponseObject))
async def retrieve_response(response_id: str, request: Request):
    return _stored(ctx_of(request), response_id).response


@router.delete("/v1/responses/{response_id}", responses=ok(Deleted))
async def delete_response(response_id: str, request: Request):
    ctx = ctx_of(request)
    _stored(ctx, response_id)
    _store(ctx).delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _stored(ctx: ServerContext, response_id: str, param: str = "response_id") -> StoredResponse:
    entry = _store(ctx).get(response_id)
    if entry is None:
        raise RequestError(f"{param}: no stored response with id {response_id!r}", param=param, status=404)
    return entry


# -- request -------------------------------------------------------------------------------
def _prepare(ctx: ServerContext, req: ResponsesRequest):
    history = _stored(ctx, req.previous_response_id, "previous_response_id").messages \
        if req.previous_response_id else []
    messages = input_messages(req.input, history)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    effort = req.reasoning.effort if req.reasoning else None
    budget = effort_budget(effort, "reasoning.effort")
    try:
        chat = ChatCompletionRequest(
            messages=system + history + messages, tools=chat_tools(req.tools),
            tool_choice=chat_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
            response_format=chat_response_format(req.text), max_completion_tokens=req.max_output_tokens,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed, stream=req.stream)
        reqs, chat_plan = prepare_chat(ctx, chat, thinking_budget=budget)
    except RequestError as exc:
        raise renamed(exc, _FIELD_NAMES) from None
    plan = ResponsePlan(req, new_id("resp").replace("-", "_"), now(), history, messages)
    return plan, reqs, chat_plan


# -- response ------------------------------------------------------------------------------
def _item_id(prefix: str) -> str:
    return new_id(prefix).replace("-", "_")


def output_item(block: Block, item_id: str, done: bool = True) -> dict:
    status = "completed" if done else "in_progress"
    if block.kind == REASONING:
        content = [{"type": "reasoning_text", "text": block.text}] if done else []
        return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
    if block.kind == TEXT:
        content = [_text_part(block.text)] if done else []
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}
    return {"id": item_id, "type": "function_call", "call_id": block.call_id, "name": block.name,
            "arguments": block.text if done else "", "status": status}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response(ctx: ServerContext, plan: ResponsePlan, output: list[dict], status: str,
              usage: Optional[dict]) -> dict:
    req = plan.req
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
        else {"type": "text"}
    tool_choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else (req.tool_choice or "auto")
    return {"id": plan.id, "object": "response", "created_at": plan.created, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": ctx.model_name,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": fmt}, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "truncation": "disabled", "usage": usage, "metadata": req.metadata or {}, "user": req.user}


def _usage(ctx: ServerContext, out: dict, blocks: list[Block]) -> dict:
    meta = out["meta_info"]
    reasoning = "".join(b.text for b in blocks if b.kind == REASONING)
    reasoning_tokens = len(ctx.tm.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
    prompt, completion = meta["prompt_tokens"], meta["completion_tokens"]
    cached = {"cached_tokens": meta["cached_tokens"], "cache_write_tokens": 0}  # writing to the cache is free
    return {"input_tokens": prompt, "input_tokens_details": cached,
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt + completion}


def _finish(ctx: ServerContext, plan: ResponsePlan, blocks: list[Block], finish: Optional[str], out: dict,
            item_ids: Optional[list[str]] = None) -> dict:
    """The final Response object; stored (with its conversation) when req.store."""
    ids = item_ids or [_item_id({REASONING: "rs", TEXT: "msg"}.get(b.kind, "fc")) for b in blocks]
    output = [output_item(b, i) for b, i in zip(blocks, ids)]
    response = _response(ctx, plan, output, "incomplete" if finish == "length" else "completed",
                         _usage(ctx, out, blocks))
    if plan.req.store:
        turn = _assistant_message(blocks)
        _store(ctx).put(StoredResponse(response, plan.history + plan.messages + [turn]))
    return response


def _assistant_message(blocks: list[Block]) -> dict:
    message: dict = {"role": "assistant", "content": "".join(b.text for b in blocks if b.kind == TEXT)}
    calls = [{"id": b.call_id, "type": "function", "function": {"name": b.name, "arguments": b.text}}
             for b in blocks if b.kind not in (REASONING, TEXT)]
    if calls:
        message["tool_calls"] = calls
    reasoning = "".join(b.text for b in blocks if b.kind == REASONING)
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


# -- streaming -----------------------------------------------------------------------------
class _Events:
    """Numbers and formats the stream's events."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


def _block_events(ev: _Events, e: BlockEvent, item_id: str) -> list[str]:
    b, where = e.block, {"item_id": item_id, "output_index": e.block.index}
    if e.op == "open":
        out = [ev("response.output_item.added", output_index=b.index, item=output_item(b, item_id, done=False))]
        if b.kind == TEXT:
            out.append(ev("response.content_part.added", **where, content_index=0, part=_text_part("")))
        elif b.kind == REASONING:
            out.append(ev("response.content_part.added", **where, content_index=0,
                          part={"type": "reasoning_text", "text": ""}))
        return out
    if e.op == "delta":
        if b.kind == TEXT:
            return [ev("response.output_text.delta", **where, content_index=0, delta=e.delta, logprobs=[])]
        if b.kind == REASONING:
            return [ev("response.reasoning_text.delta", **where, content_index=0, delta=e.delta)]
        return [ev("response.function_call_arguments.delta", **where, delta=e.delta)]
    out = []
    if b.kind == TEXT:
        out += [ev("response.output_text.done", **where, content_index=0, text=b.text, logprobs=[]),
                ev("response.content_part.done", **where, content_index=0, part=_text_part(b.text))]
    elif b.kind == REASONING:
        part = {"type": "reasoning_text", "text": b.text}
        out += [ev("response.reasoning_text.done", **where, content_index=0, text=b.text),
                ev("response.content_part.done", **where, content_index=0, part=part)]
    else:
        out.append(ev("response.function_call_arguments.done", **where, name=b.name, arguments=b.text))
    return out + [ev("response.output_item.done", output_index=b.index, item=output_item(b, item_id))]


async def _stream(ctx: ServerContext, plan: ResponsePlan, reqs, chat_plan) -> AsyncIterator[str]:
    ev = _Events()
    start = _response(ctx, plan, [], "in_progress", None)
    yield ev("response.created", response=start)
    yield ev("response.in_progress", response=start)
    parser, blocks, ids = ChoiceStreamParser(chat_plan), BlockAssembler(), []
    try:
        async for c in stream_chunks(ctx.tm, reqs):
            if c.finished:
                check_not_aborted(c.out)
            events = blocks.feed(parser.delta(c.text, c.finished)) + (blocks.finish() if c.finished else [])
            for e in events:
                if e.op == "open":
                    ids.append(_item_id({REASONING: "rs", TEXT: "msg"}.get(e.block.kind, "fc")))
                for line in _block_events(ev, e, ids[e.block.index]):
                    yield line
            if c.finished:
                final = c.out
    except RequestError as exc:
        yield ev("error", code=str(exc.status), message=exc.message, param=exc.param)
        return
    except Exception as exc:  # a bug must not hang the client
        yield ev("error", code="500", message=f"internal error: {type(exc).__name__}: {exc}", param=None)
        return
    response = _finish(ctx, plan, blocks.blocks, finish_reason_of(final["meta_info"]), final, ids)
    yield ev("response.incomplete" if response["status"] == "incomplete" else "response.completed",
             response=response)
