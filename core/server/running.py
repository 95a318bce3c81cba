"""Running prepared requests on the TokenizerManager for the HTTP handlers.

Two shapes: ``run_to_completion`` (all outputs at once) and ``stream_chunks`` (one merged
stream of incremental chunks over several requests, e.g. n > 1; assembled by
kvyard.frontend.outputs, the code kvyard.Engine uses too). Both abort every request that
has not finished when the caller goes away: a cancelled handler, a closed stream, or a client
that disconnects while a non-streaming request runs. ``openai_response`` picks one of them for
the OpenAI chat and completions endpoints.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Optional

from starlette.requests import Request

from kvyard.errors import RequestError
from kvyard.frontend.outputs import Chunk, stream_chunks, submit_all  # noqa: F401  (the handlers' imports)
from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.server.openai_format import usage_of
from kvyard.server.streaming import EventStream, with_errors_and_done

DISCONNECT_POLL_S = 0.5
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; nobody reads it


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
