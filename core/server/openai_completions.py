"""POST /v1/completions (text or token-id prompts, one or many, echo, legacy logprobs) and
POST /v1/embeddings."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np
from starlette.requests import Request

from kvyard.errors import RequestError
from kvyard.server.lora_api import adapter_of_model
from kvyard.server.context import ServerContext
from kvyard.server.offload import preprocess
from kvyard.server.openai_format import (completion_logprobs, finish_reason_of, matched_stop, new_id, now,
                                         usage_of)
from kvyard.server.openai_params import check_top_logprobs, native_request, output_constraint, prepare_constrained
from kvyard.server.protocol import CompletionRequest, EmbeddingRequest
from kvyard.server.running import check_not_aborted, openai_response, run_to_completion, stream_chunks
from kvyard.server.streaming import sse

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class CompletionPlan:
    id: str
    created: int
    n: int
    echo_texts: Optional[list[str]]     # per prompt, when echo
    top_logprobs: Optional[int]         # None: no logprobs


def prompt_field(ctx: ServerContext, prompt, name: str) -> dict:
    """A completions/embeddings prompt as the native {"text"} or {"input_ids"} field."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        ctx.require_tokenizer(name)
        return {"text": prompt}
    if not prompt or (isinstance(prompt[0], list) and not all(prompt)):
        raise RequestError(f"{name}: the prompt is empty", param=name)
    return {"input_ids": prompt}


async def completion(ctx: ServerContext, req: CompletionRequest, request: Optional[Request] = None):
    reqs, plan = await preprocess(ctx, lambda: prepare_completion(ctx, req), "prompt")
    events = (lambda: _stream(ctx, req, reqs, plan)) if req.stream else None
    return await openai_response(ctx, reqs, plan, request, "text_completion", _choice, events)


def prepare_completion(ctx: ServerContext, req: CompletionRequest):
    constraint = output_constraint(req)
    if req.suffix:
        raise RequestError("suffix: insertion (suffix) is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise RequestError("best_of: only best_of == n is supported", param="best_of")
    if req.max_tokens is not None and req.max_tokens < 0:
        raise RequestError(f"max_tokens must be >= 0, got {req.max_tokens}", param="max_tokens")
    prompt = prompt_field(ctx, req.prompt, "prompt")
    top = check_top_logprobs(req.logprobs, "logprobs") if req.logprobs is not None else None
    start = 0 if req.echo and top is not None else -1
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    obj = native_request(req, prompt, max_tokens, top, logprob_start_len=start, constraint=constraint)
    obj.setdefault("rid", new_id("cmpl"))
    lora = adapter_of_model(ctx, req.model)
    if lora is not None:
        obj["lora_path"] = lora
    reqs = prepare_constrained(ctx.tm, obj, constraint)
    echo = [_prompt_text(ctx, reqs[i].input_ids) for i in range(0, len(reqs), req.n)] if req.echo else None
    return reqs, CompletionPlan(obj["rid"], now(), req.n, echo, top)


def _prompt_text(ctx: ServerContext, ids: list[int]) -> str:
    return ctx.tm.tokenizer.decode(ids, skip_special_tokens=True) if ctx.tm.tokenizer is not None else ""


def _choice(plan: CompletionPlan, index: int, out: dict) -> dict:
    meta = out["meta_info"]
    prefix = plan.echo_texts[index // plan.n] if plan.echo_texts else ""
    logprobs = None
    if plan.top_logprobs is not None:
        token_lps, top_lps = meta["output_token_logprobs"], meta["output_top_logprobs"]
        if plan.echo_texts:
            in_lps, in_top = meta["input_token_logprobs"], meta["input_top_logprobs"]
            token_lps = in_lps + token_lps  # the first prompt token has no logprob (None)
            top_lps = [None] * (len(in_lps) - len(in_top)) + in_top + top_lps
        logprobs = completion_logprobs(token_lps, top_lps, 0, plan.top_logprobs > 0)
    return {"index": index, "text": prefix + out["text"], "logprobs": logprobs,
            "finish_reason": finish_reason_of(meta), "matched_stop": matched_stop(meta)}


async def _stream(ctx: ServerContext, req: CompletionRequest, reqs, plan: CompletionPlan) -> AsyncIterator[str]:
    base = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": ctx.model_name}
    finals: list[Optional[dict]] = [None] * len(reqs)
    offsets = [0] * len(reqs)
    if plan.echo_texts:
        for i in range(len(reqs)):
            offsets[i] = len(plan.echo_texts[i // plan.n])
            yield sse({**base, "choices": [{"index": i, "text": plan.echo_texts[i // plan.n], "logprobs": None,
                                            "finish_reason": None}]})
    async for c in stream_chunks(ctx.tm, reqs):
        if c.finished:
            check_not_aborted(c.out)
            finals[c.index] = c.out
        logprobs = None
        if plan.top_logprobs is not None and c.token_logprobs:
            logprobs = completion_logprobs(c.token_logprobs, c.top_logprobs, offsets[c.index], plan.top_logprobs > 0)
            offsets[c.index] += sum(len(t) for _, _, t in c.token_logprobs)
        if not (c.text or logprobs or c.finished):
            continue
        choice = {"index": c.index, "text": c.text, "logprobs": logprobs, "finish_reason": None}
        if c.finished:
            choice.update(finish_reason=finish_reason_of(c.out["meta_info"]), matched_stop=matched_stop(c.out["meta_info"]))
        yield sse({**base, "choices": [choice]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage_of(finals, plan.n)})


# -- embeddings ----------------------------------------------------------------------------
async def embeddings(ctx: ServerContext, req: EmbeddingRequest, request: Optional[Request] = None) -> dict:
    if ctx.is_generation:
        raise RequestError("model: the served model is not an embedding model; serve an embedding model "
                           "(or start with --is-embedding) to use /v1/embeddings", param="model")
    if req.dimensions is not None:
        raise RequestError("dimensions: shortening embeddings is not supported", param="dimensions")
    outs = await encode(ctx, prompt_field(ctx, req.input, "input"), request)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(o["embedding"], req.encoding_format)}
            for i, o in enumerate(outs)]
    tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    return {"object": "list", "data": data, "model": ctx.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def encode(ctx: ServerContext, prompt: dict, request: Optional[Request] = None) -> list[dict]:
    """Embedding outputs ({"embedding", "meta_info"}) of one or many prompts, in order."""
    reqs = await preprocess(ctx, lambda: ctx.tm.prepare_embedding(prompt), "input")
    return await run_to_completion(ctx.tm, reqs, request)


def _encoded(vector: list[float], encoding_format: str):
    if encoding_format == "base64":  # what the openai SDK asks for by default: little-endian float32
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
