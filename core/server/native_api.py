"""SGLang-style native routes: /generate, health, model and server info, cache and weights
control, abort, /encode and /classify, parsers, and a KV integrity probe for tests."""
from __future__ import annotations

import asyncio
import platform
from dataclasses import replace
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvyard.errors import EngineDeadError, RequestError
from kvyard.server.context import ServerContext, ctx_of
from kvyard.server.admin import check_weight_update, weight_update_failed
from kvyard.server.errors import error_response
from kvyard.server.offload import json_response, preprocess
from kvyard.server.openai_completions import encode
from kvyard.server.protocol import (AbortRequest, AdminResult, EncodeRequest, FunctionCallRequest, GenerateRequest,
                                    SeparateReasoningRequest, UpdateWeightsRequest)
from kvyard.server.running import check_not_aborted, run_to_completion, stream_chunks
from kvyard.server.streaming import EventStream, sse, with_errors_and_done

router = APIRouter()

HEALTH_GENERATE_TIMEOUT_S = 60.0
UPDATE_WEIGHTS_TIMEOUT_S = 1800.0
SECRET_ARGS = ("api_key", "admin_api_key")


# -- generation ----------------------------------------------------------------------------
@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(body: GenerateRequest, request: Request):
    ctx = ctx_of(request)
    obj = body.model_dump(exclude_none=True)
    text_in_logprobs = bool(obj.pop("return_text_in_logprobs", False))
    reqs = await preprocess(ctx, lambda: ctx.tm.prepare(obj), "text")
    batch = len(reqs) > 1 or isinstance(obj.get("text", obj.get("prompt")), list) \
        or _is_batch_ids(obj.get("input_ids"))
    if obj.get("stream"):
        return EventStream(with_errors_and_done(_stream(ctx, reqs, batch, text_in_logprobs)))
    outs = await run_to_completion(ctx.tm, reqs, request, allow_user_abort=True)
    outs = [_strip_token_text(o) for o in outs] if not text_in_logprobs else outs
    return await json_response(ctx, outs if batch else outs[0])


async def _stream(ctx: ServerContext, reqs, batch: bool, text_in_logprobs: bool) -> AsyncIterator[str]:
    """SGLang's stream shape: every event holds the cumulative output so far."""
    async for c in stream_chunks(ctx.tm, reqs):
        if c.finished:
            check_not_aborted(c.out, allow_user_abort=True)
        out = c.out if text_in_logprobs else _strip_token_text(c.out)
        yield sse({**out, "index": c.index} if batch else out)


def _strip_token_text(out: dict) -> dict:
    """Token texts in logprobs only when asked (return_text_in_logprobs), as in SGLang."""
    meta = out["meta_info"]
    if "output_token_logprobs" not in meta:
        return out
    strip = lambda triples: [(lp, tid, None) for lp, tid, _ in triples]  # noqa: E731
    new = dict(meta)
    for key in ("output_token_logprobs", "input_token_logprobs"):
        new[key] = strip(meta[key])
    for key in ("output_top_logprobs", "input_top_logprobs"):
        new[key] = [strip(t) if t else t for t in meta[key]]
    return {**out, "meta_info": new}


def _is_batch_ids(ids: Any) -> bool:
    return isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)


@router.post("/encode")
async def encode_route(body: EncodeRequest, request: Request):
    return await _embed(body, request)


@router.post("/classify")
async def classify(body: EncodeRequest, request: Request):
    """Reward and classification models serve their scores as the embedding vector."""
    return await _embed(body, request)


async def _embed(body: EncodeRequest, request: Request):
    ctx = ctx_of(request)
    obj = body.model_dump(exclude_none=True)
    outs = await encode(ctx, obj, request)
    batch = isinstance(obj.get("text"), list) or _is_batch_ids(obj.get("input_ids"))
    return outs if batch else outs[0]


@router.post("/abort_request")
async def abort_request(body: AbortRequest, request: Request):
    if not body.rid and not body.abort_all:
        raise RequestError("rid: give a request id, or abort_all: true", param="rid")
    ctx_of(request).tm.abort("" if body.abort_all else body.rid)
    return {"success": True}


# -- health and info -----------------------------------------------------------------------
@router.get("/health", response_class=Response, responses={200: {"description": "ready (no body)", "content": {}}})
async def health(request: Request):
    ctx = ctx_of(request)
    if ctx.tm.dead:
        return error_response(503, f"the engine is not running: {ctx.tm.dead}")
    if not ctx.ready:
        return error_response(503, "the server is starting up")
    return Response(status_code=200)


@router.get("/health_generate", response_class=Response,
            responses={200: {"description": "a one-token generation passed (no body)", "content": {}}})
async def health_generate(request: Request):
    """Health with a one-token generation through the whole engine."""
    ctx = ctx_of(request)
    if ctx.is_generation:
        obj = {"input_ids": [[ctx.tm.vocab_size // 2] * 4], "sampling_params": {"max_new_tokens": 1}}
        job = run_to_completion(ctx.tm, ctx.tm.prepare(obj), request)
    else:
        job = encode(ctx, {"input_ids": [ctx.tm.vocab_size // 2] * 4}, request)
    try:
        await asyncio.wait_for(job, HEALTH_GENERATE_TIMEOUT_S)
    except (asyncio.TimeoutError, EngineDeadError, RequestError) as exc:
        return error_response(503, f"generation failed: {type(exc).__name__}: {exc}")
    return Response(status_code=200)


@router.get("/get_model_info")
async def get_model_info(request: Request):
    ctx = ctx_of(request)
    # the tokenizer is the one loaded at start, whatever weights were loaded since
    return {"model_path": ctx.args.model_path, "tokenizer_path": ctx.args.tokenizer_path or ctx.engine.args.model_path,
            "is_generation": ctx.is_generation}


@router.get("/get_server_info")
async def get_server_info(request: Request):
    ctx = ctx_of(request)
    reply = await ctx.tm.control("get_info")
    args = {k: ("***" if k in SECRET_ARGS and v else v) for k, v in ctx.args.to_dict().items()}
    return {**args, **reply.result, "version": versions()["kvyard"], "versions": versions()}


def versions() -> dict:
    import torch
    import transformers

    from kvyard import __version__
    return {"kvyard": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@router.get("/debug/kv_integrity")
async def kv_integrity(request: Request):
    """Every KV slot is free, cached or owned by a running request — exactly one (tests use it)."""
    ctx = ctx_of(request)
    check = await ctx.tm.control("check_integrity")
    load = await ctx.tm.control("get_info")
    return {"ok": check.ok, "message": check.message,
            "num_running_reqs": load.result["num_running_reqs"], "num_queue_reqs": load.result["num_queue_reqs"],
            "num_api_requests": ctx.tm.num_running()}


# -- control -------------------------------------------------------------------------------
@router.api_route("/flush_cache", methods=["POST", "GET"], response_model=AdminResult,
                  responses={400: {"model": AdminResult, "description": "requests are running; not flushed"}})
async def flush_cache(request: Request):
    reply = await ctx_of(request).tm.control("flush_cache")
    message = "cache flushed" if reply.ok else reply.message
    return JSONResponse({"success": reply.ok, "message": message}, status_code=200 if reply.ok else 400)


@router.post("/update_weights_from_disk", response_model=AdminResult,
             responses={400: {"model": AdminResult, "description": "not a model the server may load"}})
async def update_weights_from_disk(body: UpdateWeightsRequest, request: Request):
    """Loads new weights of the same architecture; on failure the old weights keep serving.
    The path must lie in --weight-update-dirs and the format be one a client may choose."""
    ctx = ctx_of(request)
    path = check_weight_update(ctx.args, ctx.engine.args.model_path, body.model_path, body.load_format)
    if path is None:
        return weight_update_failed(body.model_path, "outside --weight-update-dirs, missing, or not a model")
    reply = await ctx.tm.control("update_weights", timeout=UPDATE_WEIGHTS_TIMEOUT_S,
                                 model_path=path, load_format=body.load_format)
    if not reply.ok:
        return weight_update_failed(body.model_path, reply.message)
    ctx.args = replace(ctx.args, model_path=path, load_format=body.load_format or "auto")
    return JSONResponse({"success": True, "message": reply.message})


# -- parsers -------------------------------------------------------------------------------
@router.post("/function_call")
async def function_call(body: FunctionCallRequest, request: Request):
    """Parses tool calls out of a text: {"text", "tools", "tool_call_parser"}."""
    from kvyard.parsers import FunctionCallParser

    ctx = ctx_of(request)
    text, tools = body.text, [t.model_dump(exclude_none=True) for t in body.tools]
    name = body.tool_call_parser or ctx.args.tool_call_parser
    if not name:
        raise RequestError("tool_call_parser: give one (or start the server with --tool-call-parser)",
                           param="tool_call_parser")
    try:
        normal, calls = FunctionCallParser(tools, name).parse_non_stream(text)
    except ValueError as exc:
        raise RequestError(str(exc), param="tool_call_parser" if "tools" not in str(exc) else "tools") from None
    return {"normal_text": normal,
            "calls": [{"tool_index": c.tool_index, "name": c.name, "parameters": c.parameters} for c in calls]}


@router.post("/separate_reasoning")
async def separate_reasoning(body: SeparateReasoningRequest, request: Request):
    """Splits a text into reasoning and answer: {"text", "reasoning_parser"}."""
    from kvyard.parsers import ReasoningParserFacade

    ctx = ctx_of(request)
    text = body.text
    name = body.reasoning_parser or ctx.args.reasoning_parser
    if not name:
        raise RequestError("reasoning_parser: give one (or start the server with --reasoning-parser)",
                           param="reasoning_parser")
    try:
        reasoning, normal = ReasoningParserFacade(name).parse_non_stream(text)
    except ValueError as exc:
        raise RequestError(str(exc), param="reasoning_parser") from None
    return {"reasoning_text": reasoning, "text": normal}


# -- metrics -------------------------------------------------------------------------------
METRICS_REFRESH_TIMEOUT_S = 5.0


async def metrics(request: Request):
    """Prometheus text format; scheduler gauges are refreshed on each scrape."""
    ctx = ctx_of(request)
    try:
        reply = await ctx.tm.control("get_info", timeout=METRICS_REFRESH_TIMEOUT_S)
        ctx.metrics.set_scheduler_load(reply.result)
    except (asyncio.TimeoutError, EngineDeadError):
        pass  # serve the last values; a busy or dead scheduler must not break the scrape
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
