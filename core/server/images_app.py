"""`kvyard serve` on a diffusers pipeline folder: the FastAPI app around a DiffusionEngine and
its ImageQueue (routes in images_api.py).

The same conventions as the LLM server: API-key middleware (auth.py), OpenAI error bodies
(errors.py), 503 until warmup passed (app.ReadinessMiddleware), one ready line, Prometheus
metrics with --enable-metrics (metrics.ImageMetrics).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fastapi import FastAPI

logger = logging.getLogger("kvyard.serve")


@dataclass
class ImageServerContext:
    args: Any                          # kvyard.diffusion.args.DiffusionArgs
    engine: Any                        # kvyard.diffusion.engine.DiffusionEngine
    queue: Any                         # kvyard.diffusion.queue.ImageQueue
    metrics: Optional[Any] = None      # kvyard.server.metrics.ImageMetrics
    ready: bool = False
    failed: Optional[str] = None
    started: int = field(default_factory=lambda: int(time.time()))
    request_shutdown: Callable[[], None] = field(default=lambda: None)
    listening: Callable[[], bool] = field(default=lambda: True)

    @property
    def model_name(self) -> str:
        return self.args.served_model_name or self.args.model_path


def create_images_app(ctx: ImageServerContext) -> FastAPI:
    from kvyard import __version__
    from kvyard.server import images_api
    from kvyard.server.app import ReadinessMiddleware
    from kvyard.server.auth import ApiKeyMiddleware
    from kvyard.server.errors import install_error_handlers
    from kvyard.server.limits import MIB, RequestBodyGuard
    from kvyard.server.openapi import install_openapi

    app = FastAPI(title="kvyard (diffusion)", version=__version__, lifespan=_lifespan(ctx))
    app.state.ctx = ctx
    install_error_handlers(app)
    install_openapi(app, api_key=bool(ctx.args.api_key))
    app.include_router(images_api.router)
    if ctx.args.enable_metrics:
        app.add_api_route("/metrics", images_api.metrics, methods=["GET"])
    # the last added is the outermost: key, then readiness, then the body's size and JSON
    app.add_middleware(RequestBodyGuard, max_bytes=int(ctx.args.max_request_body_mb * MIB))
    app.add_middleware(ReadinessMiddleware, ctx=ctx)
    if ctx.args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=ctx.args.api_key)
    return app


def _lifespan(ctx: ImageServerContext):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        warm = asyncio.ensure_future(warm_up(ctx))
        try:
            yield
        finally:
            warm.cancel()
    return lifespan


async def warm_up(ctx: ImageServerContext) -> None:
    """One single-step image at the default size, through the queue."""
    from kvyard.server.app import run_warmup

    async def warm() -> None:
        if ctx.args.skip_server_warmup:
            return
        info = ctx.engine.info
        fields = {"prompt": "warmup", "num_inference_steps": 1, "seed": 0}
        if "strength" in info.accepts:
            fields["strength"] = 1.0
        if info.needs_image:
            from PIL import Image
            fields["image"] = Image.new("RGB", (info.default_width, info.default_height))
        await asyncio.wrap_future(ctx.queue.submit(ctx.engine.make_job(fields)))
    await run_warmup(ctx, warm)


def serve_diffusion(args) -> int:
    from kvyard.cli.serve import check_port_free, run_app
    from kvyard.diffusion.engine import DiffusionEngine
    from kvyard.diffusion.queue import ImageQueue
    from kvyard.server.metrics import ImageMetrics

    logging.basicConfig(level=args.log_level.upper(), format="[kvyard] %(levelname)s %(message)s")
    check_port_free(args.host, args.port)
    logger.info("loading the pipeline…")
    engine = DiffusionEngine(args)
    metrics = ImageMetrics(args.served_model_name or args.model_path) if args.enable_metrics else None
    queue = ImageQueue(engine.run, args.max_batch_size, args.max_queued_requests,
                       on_batch=metrics.on_batch if metrics else None, batch_wait_s=args.batch_wait_ms / 1000)
    ctx = ImageServerContext(args=args, engine=engine, queue=queue, metrics=metrics)
    return run_app(create_images_app(ctx), ctx, args.host, args.port, args.log_level, cleanup=queue.close)
