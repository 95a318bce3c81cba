"""Request preprocessing (chat templating, tokenization, grammar checks) off the event loop.

``run_off_loop(fn, budget_s=...)`` runs ``fn`` on a worker thread and awaits it, so the loop keeps
serving every other client while one request renders a heavy template or tokenizes megabytes
(the tokenizers library releases the GIL while it encodes). At most ``MAX_WORKERS`` run at once;
the rest wait their turn without blocking the loop.

The budget: when ``fn`` runs longer than ``budget_s`` the caller gets a 400 at once, and the
worker is interrupted: a ``PreprocessTimeout`` is raised inside it at its next Python bytecode
(``PyThreadState_SetAsyncExc``). A Jinja template compiles to Python code, so a runaway template
stops there; a long call into native code (one encode) stops when it returns.

Invariant: the async exception only ever targets a thread of this module while it is inside
``fn`` (checked under a lock), so it cannot land in unrelated code.
"""
from __future__ import annotations

import asyncio
import ctypes
import threading
import weakref
from typing import Any, Callable, Optional

from kvyard.errors import RequestError

MAX_WORKERS = 4
_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = weakref.WeakKeyDictionary()


class PreprocessTimeout(Exception):
    """Raised inside a worker whose request ran past its preprocessing budget."""


class _Job:
    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop):
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.lock = threading.Lock()
        self.thread_id: Optional[int] = None   # set while fn runs
        self.stopped = False

    def run(self) -> None:
        try:
            with self.lock:
                if self.stopped:
                    return
                self.thread_id = threading.get_ident()
            try:
                result, error = self.fn(), None
            finally:
                with self.lock:
                    self.thread_id = None
        except BaseException as exc:  # PreprocessTimeout or fn's own error: hand it over
            result, error = None, exc
        if self.stopped:  # nobody waits for an interrupted job (its loop may be gone too)
            return
        try:
            self.loop.call_soon_threadsafe(self._settle, result, error)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def _settle(self, result: Any, error: Optional[BaseException]) -> None:
        if self.future.done() or self.stopped:
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def interrupt(self) -> None:
        with self.lock:
            self.stopped = True
            if self.thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id),
                                                           ctypes.py_object(PreprocessTimeout))


def _semaphore() -> asyncio.Semaphore:
    """MAX_WORKERS slots per event loop."""
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots[loop] = asyncio.Semaphore(MAX_WORKERS)
    return _slots[loop]


async def run_off_loop(fn: Callable[[], Any], budget_s: float, what: str = "preprocessing",
                       param: Optional[str] = None) -> Any:
    """``fn()`` on a worker thread; RequestError(400) naming ``param`` after ``budget_s`` seconds."""
    async with _semaphore():
        job = _Job(fn, asyncio.get_running_loop())
        threading.Thread(target=job.run, name="kvyard-preprocess", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), budget_s)
        except asyncio.TimeoutError:
            job.interrupt()
            raise RequestError(f"{what} took longer than the server's budget of {budget_s:g} s "
                               "(--preprocess-timeout)", param=param) from None
        except BaseException:
            job.interrupt()  # the caller went away (client disconnect): stop the work too
            raise


async def preprocess(ctx: Any, fn: Callable[[], Any], param: Optional[str] = None) -> Any:
    """``fn`` (templating, tokenizing, checking one request) off the loop under --preprocess-timeout."""
    return await run_off_loop(fn, ctx.args.preprocess_timeout, "preparing the request (templating and tokenizing)",
                              param)


async def json_response(ctx: Any, content: Any):
    """A JSON response encoded on a worker thread: a large output (logprobs of every token, many
    samples) is serialized while the loop keeps serving, and skips FastAPI's per-item encoder."""
    import json

    from starlette.responses import Response

    body = await run_off_loop(lambda: json.dumps(content, ensure_ascii=False).encode(), ctx.args.preprocess_timeout,
                              "encoding the response")
    return Response(body, media_type="application/json")
