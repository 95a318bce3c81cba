"""Server-sent events: ``data: {json}\\n\\n`` lines, ``data: [DONE]`` at the end.

EventStream closes its body generator when the response ends for any reason, including a
client that disconnects while the generator is parked between chunks: the generator's
``finally`` (running.stream_chunks) then aborts the requests, so their KV slots are freed now
rather than whenever the garbage collector gets to it.
"""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from starlette.responses import StreamingResponse

from kvyard.errors import EngineDeadError, RequestError
from kvyard.server.errors import error_body

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def with_errors_and_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Ends every stream with [DONE]; an error after the headers went out becomes an error
    event (the status code can no longer change)."""
    try:
        async for event in events:
            yield event
    except RequestError as exc:
        yield sse(error_body(exc.status, exc.message, exc.param))
    except EngineDeadError as exc:
        yield sse(error_body(503, f"the engine is not running: {exc}"))
    except Exception as exc:  # a bug must not hang the client
        logger.exception("error while streaming")
        yield sse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"))
    finally:
        await events.aclose()
    yield DONE
