"""The FastAPI app of `kvyard serve`.

Start-up (lifespan, on uvicorn's event loop): bind the TokenizerManager's sockets, open the
file/batch store, then warm up in the background. Until warmup has passed (and the socket is
bound), /health answers 503 and every other endpoint but /metrics too; then the one ready line
is printed. Shutdown: stop batches, close the TokenizerManager (the caller stops the engine).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

from fastapi import FastAPI

from kvyard.server.auth import ApiKeyMiddleware
from kvyard.server.context import ServerContext
from kvyard.server.errors import install_error_handlers
from kvyard.server.json_body import JsonBodyMiddleware
from kvyard.server.limits import send_error

logger = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({"/health", "/metrics"})


def create_app(ctx: ServerContext) -> FastAPI:
    from kvyard import __version__
    from kvyard.server import anthropic_api, files_batches, lora_api, native_api, openai_api, rerank, responses_api

    from kvyard.server.limits import MIB, RequestBodyGuard
    from kvyard.server.openapi import install_openapi

    app = FastAPI(title="kvyard", version=__version__, lifespan=_lifespan(ctx))
    app.state.ctx = ctx
    install_error_handlers(app)
    install_openapi(app, api_key=bool(ctx.args.api_key or ctx.args.admin_api_key))
    app.include_router(openai_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(files_batches.router)
    app.include_router(native_api.router)
    app.include_router(lora_api.router)
    app.include_router(rerank.router)
    if ctx.args.enable_metrics:
        from kvyard.server.metrics import FuncLatencyMiddleware
        app.add_api_route("/metrics", native_api.metrics, methods=["GET"])
        app.add_middleware(FuncLatencyMiddleware, metrics=ctx.metrics)
    app.add_middleware(JsonBodyMiddleware)
    # the last added is the outermost: key, then readiness, then the body's size and JSON
    app.add_middleware(RequestBodyGuard, max_bytes=int(ctx.args.max_request_body_mb * MIB))
    app.add_middleware(ReadinessMiddleware, ctx=ctx)
    if ctx.args.api_key or ctx.args.admin_api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=ctx.args.api_key, admin_api_key=ctx.args.admin_api_key)
    return app


def _lifespan(ctx: ServerContext):
    from kvyard.server.file_store import FileStore
    from kvyard.server.files_batches import BatchRunner

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.tm.start()
        ctx.files = FileStore(ctx.args.file_storage_path)
        ctx.batches = BatchRunner(ctx, ctx.files, ctx.args.file_storage_path)
        ctx.batches.recover()
        warm = asyncio.ensure_future(warm_up(ctx))
        try:
            yield
        finally:
            warm.cancel()
            await ctx.batches.close()
            await ctx.tm.close()
    return lifespan


class ReadinessMiddleware:
    """503 (OpenAI error body) for every endpoint but /health and /metrics until ready."""

    def __init__(self, app, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.ctx.ready or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        await send_error(send, 503, "the server is starting up (warming up); retry shortly", path=scope["path"])


# -- warmup --------------------------------------------------------------------------------
async def _warm_generate(ctx: ServerContext) -> None:
    from kvyard.server.running import run_to_completion

    prompt = {"text": "The capital city of France is"} if ctx.tm.tokenizer is not None \
        else {"input_ids": [ctx.tm.vocab_size // 2] * 8}
    reqs = ctx.tm.prepare({**prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    await run_to_completion(ctx.tm, reqs)


async def _warm_chat(ctx: ServerContext) -> None:
    from kvyard.server.running import run_to_completion

    ids = ctx.tm.apply_chat_template([{"role": "user", "content": "Hello!"}])
    await run_to_completion(ctx.tm, ctx.tm.prepare({"input_ids": ids, "sampling_params": {"max_new_tokens": 4}}))


async def _warm_encode(ctx: ServerContext) -> None:
    from kvyard.server.openai_completions import encode

    await encode(ctx, {"text": "warmup"} if ctx.tm.tokenizer is not None else {"input_ids": [ctx.tm.vocab_size // 2] * 4})


WARMUPS: dict[str, Callable[[ServerContext], Awaitable[None]]] = {
    "generate": _warm_generate, "chat": _warm_chat, "encode": _warm_encode}


def warmup_names(spec: str | None) -> list[str]:
    """--warmups "a,b" -> names; ValueError naming the unknown one."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    for name in names:
        if name not in WARMUPS:
            raise ValueError(f"warmups: unknown warmup {name!r} (known: {', '.join(sorted(WARMUPS))})")
    return names


async def warm_up(ctx: ServerContext) -> None:
    async def warm() -> None:
        if not ctx.args.skip_server_warmup:
            default = "generate" if ctx.is_generation else "encode"
            for name in warmup_names(ctx.args.warmups) or [default]:
                await WARMUPS[name](ctx)
    await run_warmup(ctx, warm)


async def run_warmup(ctx, warm: Callable[[], Awaitable[None]]) -> None:
    """Runs ``warm``, waits for the socket, then marks ctx ready and prints the one ready line;
    a failure is stored in ctx.failed and shuts the server down. ctx: any server context with
    args.host/port, ready, failed, listening() and request_shutdown()."""
    try:
        await warm()
        while not ctx.listening():
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ctx.failed = f"warmup failed: {type(exc).__name__}: {exc}"
        logger.error("%s; shutting down", ctx.failed)
        ctx.request_shutdown()
        return
    ctx.ready = True
    print(f"kvyard server ready at {ready_url(ctx.args.host, ctx.args.port)}", flush=True)


def ready_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
