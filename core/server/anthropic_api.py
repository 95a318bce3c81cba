"""POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages API).

A request becomes a chat request (anthropic_input) and runs on the chat pipeline (chat template,
tool-call and reasoning parsers, grammar-forced tool_choice any/tool); its chat choice becomes
content blocks (output_blocks): thinking, text, tool_use. Errors use Anthropic's body shape
(errors.error_body_for) and ``x-api-key`` is accepted like the Bearer key (auth.py).

usage: ``input_tokens`` counts the prompt tokens the prefix cache did not serve,
``cache_read_input_tokens`` those it did (their sum is the prompt), as Anthropic counts them.
Streaming sends message_start, then per block content_block_start / content_block_delta
(text_delta, thinking_delta, input_json_delta) / content_block_stop, then message_delta (stop
reason, usage) and message_stop; a failure after the start is an ``error`` event.
"""
from __future__ import annotations

import json
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Request

from kvyard.errors import RequestError
from kvyard.server.anthropic_input import (chat_messages, chat_tool_choice, chat_tools, system_text,
                                           thinking_budget)
from kvyard.server.anthropic_protocol import CountTokensRequest, MessagesRequest
from kvyard.server.context import ServerContext, ctx_of
from kvyard.server.errors import anthropic_error_body, renamed
from kvyard.server.openai_chat import ChoiceStreamParser, chat_choice, prepare_chat, template_ids
from kvyard.server.openai_format import finish_reason_of, matched_stop, new_id
from kvyard.server.output_blocks import REASONING, TEXT, Block, BlockAssembler, BlockEvent, blocks_of
from kvyard.server.protocol import ChatCompletionRequest
from kvyard.server.reasoning_budget import effort_budget
from kvyard.server.running import check_not_aborted, run_to_completion, stream_chunks
from kvyard.server.streaming import EventStream
from kvyard.server.response_models import MessageResponse, TokenCount, ok

router = APIRouter()
_FIELD_NAMES = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences",
                "response_format.json_schema.schema": "output_config.format.schema", "response_format": "output_config.format"}


@router.post("/v1/messages", responses=ok(MessageResponse))
async def create_message(req: MessagesRequest, request: Request):
    ctx = ctx_of(request)
    reqs, plan = _prepare(ctx, req)
    msg_id = new_id("msg").replace("-", "_")
    if req.stream:
        return EventStream(_stream(ctx, req, reqs, plan, msg_id))
    outs = await run_to_completion(ctx.tm, reqs, request)
    choice = chat_choice(plan, 0, outs[0])
    blocks = blocks_of(choice["message"])
    stop_reason, stop_sequence = _stop_reason(req, blocks, outs[0]["meta_info"])
    return {**_message(ctx, msg_id, outs[0]["meta_info"]), "content": [_content_block(b) for b in blocks],
            "stop_reason": stop_reason, "stop_sequence": stop_sequence}


@router.post("/v1/messages/count_tokens", responses=ok(TokenCount))
async def count_tokens(req: CountTokensRequest, request: Request):
    ctx = ctx_of(request)
    ctx.require_tokenizer("messages")
    chat = _chat_request(req)
    tools = [t.model_dump(exclude_none=True) for t in chat.tools] if chat.tools and chat.tool_choice != "none" else None
    return {"input_tokens": len(template_ids(ctx, chat, tools))}


# -- request -------------------------------------------------------------------------------
def _chat_request(req, **sampling) -> ChatCompletionRequest:
    system = system_text(req.system)
    tools = chat_tools(req.tools)
    return ChatCompletionRequest(
        messages=([{"role": "system", "content": system}] if system else []) + chat_messages(req.messages),
        tools=tools, tool_choice=chat_tool_choice(req.tool_choice, bool(tools)),
        parallel_tool_calls=False if req.tool_choice and req.tool_choice.disable_parallel_tool_use else None,
        **sampling)


def _prepare(ctx: ServerContext, req: MessagesRequest):
    if req.max_tokens < 1:
        raise RequestError(f"max_tokens: must be >= 1, got {req.max_tokens}", param="max_tokens")
    budget = thinking_budget(req.thinking, req.max_tokens)
    config = req.output_config
    if budget is None and config is not None:
        budget = effort_budget(config.effort, "output_config.effort")
    fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": config.format.schema_}} \
        if config is not None and config.format is not None else None
    chat = _chat_request(req, max_completion_tokens=req.max_tokens, stop=req.stop_sequences,
                         temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stream=req.stream,
                         response_format=fmt)
    try:
        return prepare_chat(ctx, chat, thinking_budget=budget)
    except RequestError as exc:
        raise renamed(exc, _FIELD_NAMES) from None


# -- response ------------------------------------------------------------------------------
def _usage(meta: dict, output_tokens: int) -> dict:
    cached = meta["cached_tokens"]
    return {"input_tokens": meta["prompt_tokens"] - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _message(ctx: ServerContext, msg_id: str, meta: dict, output_tokens: Optional[int] = None) -> dict:
    out_tokens = meta["completion_tokens"] if output_tokens is None else output_tokens
    return {"id": msg_id, "type": "message", "role": "assistant", "model": ctx.model_name, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(meta, out_tokens)}


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _content_block(block: Block, done: bool = True) -> dict:
    if block.kind == REASONING:
        return {"type": "thinking", "thinking": block.text if done else "", "signature": ""}
    if block.kind == TEXT:
        return {"type": "text", "text": block.text if done else ""}
    return {"type": "tool_use", "id": _tool_use_id(block.call_id), "name": block.name,
            "input": json.loads(block.text or "{}") if done else {}}


def _stop_reason(req: MessagesRequest, blocks: list[Block], meta: dict) -> tuple[str, Optional[str]]:
    finish, matched = finish_reason_of(meta), matched_stop(meta)
    if finish == "length":
        return "max_tokens", None
    if any(b.kind not in (REASONING, TEXT) for b in blocks):
        return "tool_use", None
    if isinstance(matched, str) and matched in (req.stop_sequences or ()):
        return "stop_sequence", matched
    return "end_turn", None


# -- streaming -----------------------------------------------------------------------------
def _event(kind: str, **fields) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


def _block_event(e: BlockEvent) -> str:
    b = e.block
    if e.op == "open":
        return _event("content_block_start", index=b.index, content_block=_content_block(b, done=False))
    if e.op == "close":
        return _event("content_block_stop", index=b.index)
    if b.kind == TEXT:
        delta = {"type": "text_delta", "text": e.delta}
    elif b.kind == REASONING:
        delta = {"type": "thinking_delta", "thinking": e.delta}
    else:
        delta = {"type": "input_json_delta", "partial_json": e.delta}
    return _event("content_block_delta", index=b.index, delta=delta)


async def _stream(ctx: ServerContext, req: MessagesRequest, reqs, plan, msg_id: str) -> AsyncIterator[str]:
    parser, blocks, started = ChoiceStreamParser(plan), BlockAssembler(), False
    try:
        async for c in stream_chunks(ctx.tm, reqs):
            if c.finished:
                check_not_aborted(c.out)
            if not started:  # after the prefill: the cache hits are known
                yield _event("message_start", message=_message(ctx, msg_id, c.out["meta_info"], output_tokens=0))
                started = True
            events = blocks.feed(parser.delta(c.text, c.finished)) + (blocks.finish() if c.finished else [])
            for e in events:
                yield _block_event(e)
            if c.finished:
                meta = c.out["meta_info"]
                stop_reason, stop_sequence = _stop_reason(req, blocks.blocks, meta)
                yield _event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                             usage=_usage(meta, meta["completion_tokens"]))
        yield _event("message_stop")
    except RequestError as exc:
        yield _event("error", error=anthropic_error_body(exc.status, exc.message)["error"])
    except Exception as exc:  # a bug must not hang the client
        yield _event("error", error=anthropic_error_body(500, f"internal error: {type(exc).__name__}: {exc}")["error"])
