"""SGLang-style native routes: /generate, health, model and server info, cache and weights
control, abort, /encode and /classify, parsers, and a KV integrity probe for tests."""
from __future__ import annotations

import asyncio
import json
import platform
from dataclasses import replace
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvyard.errors import EngineDeadError, RequestError
from kvyard.server.context import ServerContext, ctx_of
from kvyard.server.admin import check_weight_update, weight_update_failed
from kvyard.server.errors import error_response
from kvyard.server.offload import json_response, preprocess
from kvyard.server.openai_completions import encode
from kvyard.frontend.outputs import native_item, single_or_list, strip_token_text
from kvyard.server.protocol import (AbortRequest, AdminResult, EncodeRequest, FunctionCallRequest, GenerateRequest,
                                    SeparateReasoningRequest, UpdateWeightsRequest)
from kvyard.server.running import check_not_aborted, run_to_completion, stream_chunks
from kvyard.server.streaming import EventStream, sse, with_errors_and_done
from kvyard.server.response_models import (EncodeResponse, FunctionCallResult, GenerateResponse, KVIntegrity, ModelInfo,
                                            SeparateReasoningResult, ServerInfo, Success, WeightVersion, ok)

router = APIRouter()

HEALTH_GENERATE_TIMEOUT_S = 60.0
UPDATE_WEIGHTS_TIMEOUT_S = 1800.0
SECRET_ARGS = ("api_key", "admin_api_key")


# -- generation ----------------------------------------------------------------------------
@router.api_route("/generate", methods=["POST", "PUT"], responses=ok(GenerateResponse))
async def generate(body: GenerateRequest, request: Request):
    ctx = ctx_of(request)
    obj = body.model_dump(exclude_none=True)
    text_in_logprobs = bool(obj.pop("return_text_in_logprobs", False))
    reqs = await preprocess(ctx, lambda: ctx.tm.prepare(obj), "text")
    if obj.get("stream"):
        return EventStream(with_errors_and_done(_stream(ctx, reqs, text_in_logprobs)))
    outs = await run_to_completion(ctx.tm, reqs, request, allow_user_abort=True)
    outs = [strip_token_text(o) for o in outs] if not text_in_logprobs else outs
    return await json_response(ctx, single_or_list(outs, reqs.batch))


async def _stream(ctx: ServerContext, reqs, text_in_logprobs: bool) -> AsyncIterator[str]:
    """SGLang's stream shape: cumulative output per event (deltas with --incremental-streaming-output)."""
    async for c in stream_chunks(ctx.tm, reqs):
        if c.finished:
            check_not_aborted(c.out, allow_user_abort=True)
        item = native_item(c, ctx.tm.incremental_streaming, reqs.batch)
        yield sse(item if text_in_logprobs else strip_token_text(item))


@router.post("/encode", responses=ok(EncodeResponse))
async def encode_route(body: EncodeRequest, request: Request):
    return await _embed(body, request)


@router.post("/classify", responses=ok(EncodeResponse))
async def classify(body: EncodeRequest, request: Request):
    """Reward and classification models serve their scores (raw logits) as the embedding vector;
    cross-encoders take text pairs: {"text": [[query, document], ...]}."""
    return await _embed(body, request)


async def _embed(body: EncodeRequest, request: Request):
    ctx = ctx_of(request)
    obj = body.model_dump(exclude_none=True)
    # SGLang's EmbeddingReqInput fields: see kvyard.compat.request_fields
    reqs = await preprocess(ctx, lambda: ctx.tm.prepare_embedding(obj), "text")
    outs = await run_to_completion(ctx.tm, reqs, request)
    return single_or_list(outs, reqs.batch)


@router.post("/abort_request", responses=ok(Success))
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


@router.get("/get_model_info", responses=ok(ModelInfo))
async def get_model_info(request: Request):
    ctx = ctx_of(request)
    # the tokenizer is the one loaded at start, whatever weights were loaded since
    args = ctx.args
    preferred = json.loads(args.preferred_sampling_params) if args.preferred_sampling_params else None
    return {"model_path": args.model_path, "tokenizer_path": args.tokenizer_path or ctx.engine.args.model_path,
            "is_generation": ctx.is_generation, "preferred_sampling_params": preferred,
            "weight_version": args.weight_version, **chat_template_info(ctx.tm.tokenizer)}


@router.get("/get_weight_version", response_model=WeightVersion)
async def get_weight_version(request: Request):
    return {"weight_version": ctx_of(request).args.weight_version}


def chat_template_info(tokenizer) -> dict:
    """The Jinja chat template the server applies and the special tokens it refers to, so a
    client (kvyard.lang) renders role markers exactly as /v1/chat/completions does."""
    def token(name: str):
        value = getattr(tokenizer, name, None)
        return value if isinstance(value, str) else None
    template = getattr(tokenizer, "chat_template", None)
    return {"chat_template": template if isinstance(template, str) else None,
            "bos_token": token("bos_token"), "eos_token": token("eos_token")}


@router.get("/get_server_info", responses=ok(ServerInfo))
async def get_server_info(request: Request):
    ctx = ctx_of(request)
    reply = await ctx.tm.control("get_info")
    args = {k: ("***" if k in SECRET_ARGS and v else v) for k, v in ctx.args.to_dict().items()}
    return {**args, **reply.result, "version": versions()["kvyard"], "versions": versions()}


def versions() -> dict:
    """Installed versions, read from package metadata (importing torch here would load it into
    the API process)."""
    from importlib.metadata import version

    from kvyard import __version__
    return {"kvyard": __version__, "torch": version("torch"), "transformers": version("transformers"),
            "python": platform.python_version()}


@router.get("/debug/kv_integrity", responses=ok(KVIntegrity))
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
    ctx.args = replace(ctx.args, model_path=path, load_format=body.load_format or "auto",
                       weight_version=body.weight_version or ctx.args.weight_version)
    return JSONResponse({"success": True, "message": reply.message})


# -- profiling -----------------------------------------------------------------------------
async def json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


PROFILE_FIELDS = {"output_dir": str, "num_steps": int, "activities": list, "record_shapes": bool, "with_stack": bool}


@router.api_route("/start_profile", methods=["POST", "GET"])
async def start_profile(request: Request):
    """torch.profiler on the scheduler's steps; the trace goes to output_dir, else
    $KVYARD_TORCH_PROFILER_DIR (or $SGLANG_TORCH_PROFILER_DIR), else /tmp."""
    obj = await json_object(request) if await request.body() else {}
    args = {}
    for name, value in obj.items():
        if name not in PROFILE_FIELDS:
            raise RequestError(f"{name}: not supported by kvyard's profiler (fields: {', '.join(PROFILE_FIELDS)})",
                               param=name)
        if value is not None and not isinstance(value, PROFILE_FIELDS[name]):
            raise RequestError(f"{name}: must be of type {PROFILE_FIELDS[name].__name__}", param=name)
        if value is not None:
            args[name] = value
    reply = await ctx_of(request).tm.control("start_profile", **args)
    if not reply.ok:
        raise RequestError(reply.message.split(": ", 1)[-1])
    return Response(f"Start profiling. Traces go to {reply.result['output_dir']}\n", media_type="text/plain")


@router.api_route("/stop_profile", methods=["POST", "GET"])
async def stop_profile(request: Request):
    reply = await ctx_of(request).tm.control("stop_profile")
    if not reply.ok:
        raise RequestError(reply.message.split(": ", 1)[-1])
    return Response(f"Stop profiling. Trace written to {reply.result['trace']}\n", media_type="text/plain")


# -- parsers -------------------------------------------------------------------------------
@router.post("/function_call", responses=ok(FunctionCallResult))
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


@router.post("/separate_reasoning", responses=ok(SeparateReasoningResult))
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
