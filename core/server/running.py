"""Running prepared requests on the TokenizerManager for the HTTP handlers.

Two shapes: ``run_to_completion`` (all outputs at once) and ``stream_chunks`` (one merged
stream of incremental chunks over several requests, e.g. n > 1). Both abort every request that
has not finished when the caller goes away: a cancelled handler, a closed stream, or a client
that disconnects while a non-streaming request runs. ``openai_response`` picks one of them for
the OpenAI chat and completions endpoints.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from starlette.requests import Request

from kvyard.errors import RequestError
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.server.openai_format import usage_of
from kvyard.server.streaming import EventStream, with_errors_and_done

DISCONNECT_POLL_S = 0.5
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody reads it


@dataclass
class Chunk:
    """What one request produced since its previous chunk."""
    index: int                 # position of the request in the submitted list
    text: str                  # new visible text (stop strings never leak)
    ids: list[int]             # new output token ids
    token_logprobs: list       # new (logprob, token_id, token_text) triples
    top_logprobs: list         # new per-token lists of (logprob, token_id, token_text)
    out: dict                  # the cumulative output {"text", "output_ids", "meta_info"}
    finished: bool


@dataclass
class _Progress:
    ids: int = 0
    logprobs: int = 0
    states: list = field(default_factory=list)


def submit_all(tm, reqs: list[TokenizedGenerateReq]) -> list:
    """Submits every request or none (a failure aborts the ones already sent)."""
    states = []
    try:
        for r in reqs:
            states.append(tm.submit(r, True))
    except BaseException:
        for s in states:
            tm.abort_state(s)
        raise
    return states


USER_ABORT_MESSAGE = "aborted"  # what the scheduler says of a request aborted on request


def check_not_aborted(out: dict, allow_user_abort: bool = False) -> None:
    """An output the scheduler aborted (rejected, queue full, /abort_request) is an error;
    with allow_user_abort, one aborted through /abort_request is returned as it is."""
    reason = out["meta_info"].get("finish_reason") or {}
    if reason.get("type") == "abort":
        message = reason.get("message") or USER_ABORT_MESSAGE
        if allow_user_abort and message == USER_ABORT_MESSAGE:
            return
        status = 503 if "queue is full" in message else 400
        raise RequestError(f"the request was aborted: {message}", status=status)


async def run_to_completion(tm, reqs: list[TokenizedGenerateReq], request: Optional[Request] = None,
                            allow_user_abort: bool = False) -> list[dict]:
    """Final outputs in request order. A client disconnect (polled) cancels and aborts them."""
    states = submit_all(tm, reqs)
    task = asyncio.ensure_future(asyncio.gather(*(tm.final_output(s) for s in states)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if request is not None and await request.is_disconnected():
                raise RequestError("the client disconnected", status=CLIENT_CLOSED_REQUEST)
        outs = task.result()
    finally:
        task.cancel()
        for s in states:
            tm.abort_state(s)
    for out in outs:
        check_not_aborted(out, allow_user_abort)
    return outs


async def openai_response(ctx: Any, reqs: list[TokenizedGenerateReq], plan: Any, request: Optional[Request],
                          object_name: str, choice: Callable[[Any, int, dict], dict],
                          events: Optional[Callable[[], AsyncIterator[str]]] = None):
    """An EventStream of ``events()`` when the request streams, else the whole response object
    with ``choice(plan, index, out)`` per output. ``plan`` has id, created and n."""
    if events is not None:
        return EventStream(with_errors_and_done(events()))
    outs = await run_to_completion(ctx.tm, reqs, request)
    return {"id": plan.id, "object": object_name, "created": plan.created, "model": ctx.model_name,
            "choices": [choice(plan, i, out) for i, out in enumerate(outs)],
            "usage": usage_of(outs, plan.n)}


async def stream_chunks(tm, reqs: list[TokenizedGenerateReq]) -> AsyncIterator[Chunk]:
    """Incremental chunks of all requests, interleaved as they arrive. Closing or cancelling
    the iterator aborts the unfinished requests."""
    states = submit_all(tm, reqs)
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, state) -> None:
        progress = _Progress()
        try:
            async for out in tm.stream_outputs(state):
                queue.put_nowait(_chunk_of(tm, index, state, out, progress))
        except Exception as exc:  # EngineDeadError: hand it to the consumer
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(states)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in states:
            tm.abort_state(s)


def _chunk_of(tm, index: int, state, out: dict, progress: _Progress) -> Chunk:
    """Computed right when the update is taken, so the text delta matches the ids delta."""
    text = tm.delta_of(state)
    ids = out["output_ids"][progress.ids:]
    progress.ids = len(out["output_ids"])
    meta = out["meta_info"]
    token_lps = meta.get("output_token_logprobs", [])
    top_lps = meta.get("output_top_logprobs", [])
    new_lps, new_top = token_lps[progress.logprobs:], top_lps[progress.logprobs:]
    progress.logprobs = len(token_lps)
    return Chunk(index, text, ids, new_lps, new_top, out, finished=meta.get("finish_reason") is not None)
