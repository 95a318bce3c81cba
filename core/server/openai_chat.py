"""POST /v1/chat/completions: messages -> chat template -> engine -> OpenAI chat objects.

With --reasoning-parser the thinking text goes to ``reasoning_content``; with
--tool-call-parser and ``tools`` the calls go to ``tool_calls`` (finish_reason "tool_calls").
Both run per choice, on the whole text (non-stream) or chunk by chunk (stream).

tool_choice "required" or a named function forces a call: the output is constrained to
kvyard.grammar.tool_constraints' JSON shape and read back with its own reader, not the model's parser
(no reasoning part either: the grammar allows only the calls).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Optional

from starlette.requests import Request

from kvyard.errors import RequestError
from kvyard.server.lora_api import adapter_of_model
from kvyard.server.context import ServerContext
from kvyard.server.offload import preprocess
from kvyard.server.openai_format import (chat_logprobs, finish_reason_of, matched_stop, message_of_tool_call,
                                         new_call_id, new_id, now, tool_call_dict, usage_of)
from kvyard.server.openai_params import (chat_max_tokens, check_top_logprobs, native_request, output_constraint,
                                         prepare_constrained)
from kvyard.server.protocol import ChatCompletionRequest, ChatMessage
from kvyard.server.running import check_not_aborted, openai_response, stream_chunks
from kvyard.server.streaming import sse

# chat_template_kwargs may not override what the server itself passes, nor tokenizer options
_RESERVED_TEMPLATE_KWARGS = {"tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
                             "tools", "conversation", "messages", "padding", "truncation", "max_length",
                             "return_tensors", "return_assistant_tokens_mask", "tokenizer_kwargs"}
# a template from the request runs code the operator never saw: only with --trust-request-chat-template
REQUEST_TEMPLATE_KWARG = "chat_template"


@dataclass(frozen=True)
class ChatPlan:
    id: str
    created: int
    n: int
    logprobs: bool
    tools: Optional[list[dict]]            # OpenAI tool dicts (template, parsers)
    tool_call_parser: Optional[str]        # the model's own format, read when tool_choice is auto
    forced_tools: bool                     # tool_choice required/named: the output is the constrained calls
    reasoning_parser: Optional[str]
    stream_reasoning: bool


async def chat_completion(ctx: ServerContext, req: ChatCompletionRequest, request: Optional[Request] = None):
    """A response dict, or an EventStream when req.stream."""
    reqs, plan = await preprocess(ctx, lambda: prepare_chat(ctx, req), "messages")
    events = (lambda: _stream(ctx, req, reqs, plan)) if req.stream else None
    return await openai_response(ctx, reqs, plan, request, "chat.completion", chat_choice, events)


# -- request -------------------------------------------------------------------------------
def prepare_chat(ctx: ServerContext, req: ChatCompletionRequest, thinking_budget: Optional[int] = None):
    """(requests, plan). ``thinking_budget`` (the other APIs' own field) overrides reasoning_effort."""
    from kvyard.server.reasoning_budget import effort_budget, thinking_fields

    ctx.require_tokenizer("messages")
    forced = _forced_tool_call(req)
    constraint = output_constraint(req, forced)
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs: requires logprobs=true", param="top_logprobs")
    top = check_top_logprobs(req.top_logprobs, "top_logprobs") if req.logprobs else None
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    ids = template_ids(ctx, req, tools)
    obj = native_request(req, {"input_ids": ids}, chat_max_tokens(req, ctx.tm.context_length), top,
                         constraint=constraint)
    obj.setdefault("rid", new_id("chatcmpl"))
    lora = adapter_of_model(ctx, req.model)
    if lora is not None:
        obj["lora_path"] = lora
    if thinking_budget is None:
        thinking_budget = effort_budget(req.reasoning_effort, "reasoning_effort")
    if constraint is None and req.separate_reasoning:  # a grammar would constrain the thinking too
        obj["sampling_params"].update(thinking_fields(ctx, thinking_budget))
    reqs = prepare_constrained(ctx.tm, obj, constraint)
    parser = ctx.args.tool_call_parser if tools and not forced else None
    reasoning = ctx.args.reasoning_parser if req.separate_reasoning and not forced else None
    plan = ChatPlan(id=obj["rid"], created=now(), n=req.n, logprobs=req.logprobs, tools=tools,
                    tool_call_parser=parser, forced_tools=forced is not None, reasoning_parser=reasoning,
                    stream_reasoning=req.stream_reasoning)
    return reqs, plan


def _forced_tool_call(req: ChatCompletionRequest) -> Optional[tuple[str, str]]:
    """tool_call_constraint's (kind, spec) when tool_choice forces a call, else None."""
    from kvyard.grammar.tool_constraints import tool_call_constraint

    try:
        return tool_call_constraint(req.tools, req.tool_choice, parallel=req.parallel_tool_calls is not False)
    except ValueError as exc:
        message = str(exc)
        message = message if message.startswith("tool_choice") else f"tool_choice: {message}"
        raise RequestError(message, param="tool_choice") from None


def template_ids(ctx: ServerContext, req: ChatCompletionRequest, tools: Optional[list[dict]]) -> list[int]:
    messages = [_message_dict(m, i) for i, m in enumerate(req.messages)]
    kwargs = dict(req.chat_template_kwargs or {})
    bad = _RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if bad:
        raise RequestError(f"chat_template_kwargs: {sorted(bad)[0]!r} is set by the server", param="chat_template_kwargs")
    if REQUEST_TEMPLATE_KWARG in kwargs and not ctx.args.trust_request_chat_template:
        raise RequestError("chat_template_kwargs.chat_template: the server does not accept chat templates from "
                           "requests (start it with --trust-request-chat-template to allow them)",
                           param="chat_template_kwargs.chat_template")
    if tools:
        kwargs["tools"] = tools
    if req.continue_final_message:
        if messages[-1]["role"] != "assistant":
            raise RequestError("continue_final_message: the last message must be the assistant's",
                               param="continue_final_message")
        kwargs.update(add_generation_prompt=False, continue_final_message=True)
    if not getattr(ctx.tm.tokenizer, "chat_template", None):
        raise RequestError("messages: the model has no chat template; start the server with --chat-template",
                           param="messages")
    try:
        return ctx.tm.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # the template's own checks (role order, ...) are the user's to fix
        raise RequestError(f"messages: the chat template rejected them: {exc}", param="messages") from None


def _message_dict(m: ChatMessage, index: int) -> dict:
    out = {"role": m.role, "content": _content_text(m, index)}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [message_of_tool_call(c) for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content
    return out


def _content_text(m: ChatMessage, index: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    texts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise RequestError(f"messages.{index}.content: only text parts are supported, got {part.type!r}",
                               param=f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


# -- response ------------------------------------------------------------------------------
def chat_choice(plan: ChatPlan, index: int, out: dict) -> dict:
    meta = out["meta_info"]
    text, reasoning, calls = out["text"], None, []
    if plan.reasoning_parser:
        from kvyard.parsers import ReasoningParserFacade
        reasoning, text = ReasoningParserFacade(plan.reasoning_parser).parse_non_stream(text)
    if plan.tool_call_parser:
        from kvyard.parsers import FunctionCallParser
        text, calls = FunctionCallParser(plan.tools, plan.tool_call_parser).parse_non_stream(text)
    elif plan.forced_tools:
        text, calls = _forced_calls(plan, text)
    message: dict = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning is not None:
        message["reasoning_content"] = reasoning or None
    if calls:
        message["tool_calls"] = [tool_call_dict(c) for c in calls]
    finish = finish_reason_of(meta)
    if calls and finish == "stop":
        finish = "tool_calls"
    logprobs = chat_logprobs(meta["output_token_logprobs"], meta["output_top_logprobs"]) if plan.logprobs else None
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish,
            "matched_stop": matched_stop(meta)}


def _forced_calls(plan: ChatPlan, text: str) -> tuple[str, list]:
    """("", calls) of a constrained output; (text, []) when it is not whole (cut by max_tokens).
    An array cut only before the end token is whole: its calls come back, finish_reason "length"."""
    from kvyard.grammar.tool_constraints import parse_constrained_tool_calls

    try:
        return "", parse_constrained_tool_calls(text, plan.tools)
    except ValueError:
        return text, []


class ChoiceStreamParser:
    """Reasoning, then tool calls, over one choice's text deltas (one instance per choice)."""

    def __init__(self, plan: ChatPlan):
        self.reasoning = self.tools = self.forced = None
        if plan.reasoning_parser:
            from kvyard.parsers import ReasoningParserFacade
            self.reasoning = ReasoningParserFacade(plan.reasoning_parser, stream_reasoning=plan.stream_reasoning)
        if plan.tool_call_parser:
            from kvyard.parsers import FunctionCallParser
            self.tools = FunctionCallParser(plan.tools, plan.tool_call_parser)
        elif plan.forced_tools:
            from kvyard.grammar.tool_constraints import ConstrainedToolCallStream
            self.forced = ConstrainedToolCallStream()
        self.call_ids: dict[int, str] = {}

    @property
    def saw_calls(self) -> bool:
        return bool(self.call_ids)

    def delta(self, text: str, final: bool) -> dict:
        reasoning, normal = "", text
        if self.reasoning:
            reasoning, normal = self.reasoning.parse_stream_chunk(text)
            if final:
                r, t = self.reasoning.finish_stream()
                reasoning, normal = reasoning + r, normal + t
        calls = []
        if self.tools:
            normal, calls = self.tools.parse_stream_chunk(normal)
            if final:
                t, more = self.tools.finish_stream()
                normal, calls = normal + t, calls + more
        elif self.forced:
            normal, calls = "", self.forced.feed(normal)
        out: dict = {}
        if reasoning:
            out["reasoning_content"] = reasoning
        if normal:
            out["content"] = normal
        if calls:
            out["tool_calls"] = [self._call_delta(c) for c in calls]
        return out

    def _call_delta(self, call) -> dict:
        if call.name is not None:
            self.call_ids.setdefault(call.tool_index, new_call_id())
        return tool_call_dict(call, self.call_ids.get(call.tool_index), index=call.tool_index)


async def _stream(ctx: ServerContext, req: ChatCompletionRequest, reqs, plan: ChatPlan) -> AsyncIterator[str]:
    base = {"id": plan.id, "object": "chat.completion.chunk", "created": plan.created, "model": ctx.model_name}
    parsers = [ChoiceStreamParser(plan) for _ in reqs]
    finals: list[Optional[dict]] = [None] * len(reqs)
    for i in range(len(reqs)):
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    async for c in stream_chunks(ctx.tm, reqs):
        if c.finished:
            check_not_aborted(c.out)
            finals[c.index] = c.out
        delta = parsers[c.index].delta(c.text, c.finished)
        logprobs = chat_logprobs(c.token_logprobs, c.top_logprobs) if plan.logprobs and c.token_logprobs else None
        if not (delta or logprobs or c.finished):
            continue
        choice = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        if c.finished:
            meta = c.out["meta_info"]
            finish = finish_reason_of(meta)
            choice.update(finish_reason="tool_calls" if parsers[c.index].saw_calls and finish == "stop" else finish,
                          matched_stop=matched_stop(meta))
        yield sse({**base, "choices": [choice]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage_of(finals, plan.n)})
