"""The router's HTTP app: management routes, its own /health and /metrics, and a proxy for
everything else (OpenAI and native endpoints, SSE streams passed through byte for byte).

Retry rule: an attempt that fails before the router has sent anything back to the client
(connection refused or reset, the worker dying before its response or before a stream's first
chunk, a 503 from a worker that is not serving) marks that worker unhealthy and is retried on
another healthy worker, at most ``max_retries`` times. Once bytes went to the client there is no
retry: the stream ends. No healthy worker left -> 503 with an OpenAI error body.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvyard.router.config import RouterConfig, check_url
from kvyard.router.metrics import RouterMetrics
from kvyard.router.policies import make_policy
from kvyard.router.routing_text import routing_info
from kvyard.router.workers import Worker, WorkerPool
from kvyard.server.errors import error_body

logger = logging.getLogger("kvyard.router")
HOP_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding",
                         "te", "upgrade", "proxy-authorization",
                         "accept-encoding"})  # bodies pass through undecoded
OPEN_PATHS = frozenset({"/health", "/metrics"})
ROUTE_LABELS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/messages",
                          "/generate", "/encode", "/v1/models", "/get_model_info", "/get_server_info"})
WORKER_HEADER = "x-kvyard-worker"  # on every proxied response: the worker that served it


class NoWorker(Exception):
    pass


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.policy = make_policy(cfg.policy, cfg.cache_aware)
        self.metrics = RouterMetrics(self.policy)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_secs, connect=5.0), limits=limits)
        self.auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.pool = WorkerPool(cfg.worker_urls, self.client, self.auth, cfg.health_check_interval_secs,
                               cfg.health_check_timeout_secs, on_removed=self.policy.on_removed)

    # -- one attempt --------------------------------------------------------------------------
    async def _attempt(self, worker: Worker, request: Request, path: str, body: bytes) -> Response:
        """Raises httpx.HTTPError (or NoWorker for a 503) when nothing reached the client yet."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers.update(self.auth)
        req = self.client.build_request(request.method, worker.url + path, params=request.query_params,
                                        headers=headers, content=body)
        resp = await self.client.send(req, stream=True)
        try:
            if resp.status_code == 503:
                raise NoWorker(f"{worker.url} answered 503")
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
            out_headers[WORKER_HEADER] = worker.url
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                content = await resp.aread()
                return Response(content, resp.status_code, out_headers)
            chunks = resp.aiter_raw()
            first = await chunks.__anext__()
        except BaseException:
            await resp.aclose()
            raise
        return StreamingResponse(self._relay(worker, resp, first, chunks), resp.status_code, out_headers)

    async def _relay(self, worker: Worker, resp: httpx.Response, first: bytes, chunks):
        worker.load += 1  # the stream holds the worker until its last byte (the attempt's count ended)
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as exc:
            self.pool.mark_failed(worker, f"stream broke: {type(exc).__name__}")
            self.metrics.failures.labels(worker.url).inc()
            # the client already has part of the answer: no retry; end with an error event, not silently
            body = error_body(503, f"the worker {worker.url} failed mid-stream ({type(exc).__name__}); "
                                   "the output is incomplete")
            yield f"\n\ndata: {json.dumps(body)}\n\n".encode()
        finally:
            worker.load -= 1
            await resp.aclose()

    # -- a routed request ---------------------------------------------------------------------
    async def proxy(self, request: Request, path: str) -> Response:
        body = await request.body()
        text, _ = routing_info(body) if request.method == "POST" else ("", False)
        tried: set[str] = set()
        for attempt in range(self.cfg.max_retries + 1):
            workers = self.pool.healthy(frozenset(tried))
            if not workers:
                break
            worker, decision = self.policy.select(workers, text)
            self.metrics.decisions.labels(self.policy.name, decision).inc()
            self.metrics.requests.labels(worker.url, path if path in ROUTE_LABELS else "other").inc()
            if attempt:
                self.metrics.retries.inc()
            worker.load += 1
            try:
                return await self._attempt(worker, request, path, body)
            except (httpx.HTTPError, NoWorker, StopAsyncIteration) as exc:
                tried.add(worker.url)
                self.metrics.failures.labels(worker.url).inc()
                self.pool.mark_failed(worker, f"{path}: {type(exc).__name__} {exc}".strip())
            finally:
                worker.load -= 1
        self.metrics.no_worker.inc()
        why = "all tried workers failed" if tried else "no worker is registered" if not self.pool.workers \
            else "every worker is unhealthy"
        return JSONResponse(error_body(503, f"no healthy worker to serve {path}: {why} "
                                            f"({len(self.pool.workers)} registered)"), 503)

    async def evict_loop(self) -> None:
        while hasattr(self.policy, "evict"):
            await asyncio.sleep(self.cfg.cache_aware.eviction_interval_secs)
            self.policy.evict()


def create_router_app(cfg: RouterConfig, on_ready=lambda: None) -> FastAPI:
    """``on_ready()`` runs once the first health check of the given workers is done."""
    router = Router(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await router.pool.check_all()
        tasks = [asyncio.create_task(router.pool.health_loop()), asyncio.create_task(router.evict_loop())]
        on_ready()
        yield
        for t in tasks:
            t.cancel()
        await router.client.aclose()

    app = FastAPI(title="kvyard router", lifespan=lifespan)
    app.state.router = router

    if cfg.api_key:  # a middleware costs every request: only when there is a key to check
        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path not in OPEN_PATHS:
                given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                if not secrets.compare_digest(given.encode(), cfg.api_key.encode()):
                    return JSONResponse(error_body(401, "invalid or missing API key (Authorization: Bearer KEY)"), 401)
            return await call_next(request)

    @app.get("/health")
    async def health():
        n = len(router.pool.healthy())
        if n == 0:
            return JSONResponse(error_body(503, "no healthy worker"), 503)
        return {"status": "ok", "healthy_workers": n}

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(router.pool.workers.values()), media_type="text/plain; version=0.0.4")

    @app.get("/list_workers")
    async def list_workers():
        ws = list(router.pool.workers.values())
        return {"urls": [w.url for w in ws], "policy": router.policy.name,
                "workers": [{"url": w.url, "healthy": w.healthy, "load": w.load} for w in ws]}

    @app.post("/add_worker")
    async def add_worker(url: str = ""):
        try:
            url = check_url(url)
        except ValueError as exc:
            return JSONResponse(error_body(400, f"url: {exc}", "url"), 400)
        worker = router.pool.add(url)
        healthy = await router.pool.check(worker)
        return {"success": True, "url": url, "healthy": healthy}

    @app.post("/remove_worker")
    async def remove_worker(url: str = ""):
        if router.pool.remove(url.rstrip("/")) is None:
            return JSONResponse(error_body(404, f"url: no worker {url!r} is registered", "url"), 404)
        return {"success": True, "url": url.rstrip("/")}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def proxied(request: Request, path: str):
        return await router.proxy(request, "/" + path)

    return app
