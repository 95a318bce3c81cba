"""The router's HTTP behaviour against tiny in-process fake workers: proxying (JSON and SSE),
retries past a dead worker, 503 without healthy workers, add/remove/list, API key, metrics."""
import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from kvyard.router.app import create_router_app
from kvyard.router.config import CacheAwareConfig, RouterConfig
from kvyard.utils import free_port


def fake_worker(name: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body.get("stream"):
            async def events():
                for i in range(3):
                    yield f"data: {json.dumps({'worker': name, 'i': i})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"worker": name, "prompt": body["prompt"], "auth": request.headers.get("authorization")}

    @app.post("/generate")
    async def broken_stream():  # one chunk, then the worker "dies" (connection cut mid-body)
        async def events():
            yield "data: {\"text\": \"par\"}\n\n"
            raise RuntimeError("worker crashed")
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "fake"}]}

    return app


class Served:
    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def workers():
    ws = [Served(fake_worker("a")), Served(fake_worker("b"))]
    yield ws
    for w in ws:
        w.stop()


def start_router(urls, policy="round_robin", api_key=None) -> Served:
    cfg = RouterConfig(tuple(urls), policy, CacheAwareConfig(), api_key=api_key, health_check_interval_secs=0.3)
    return Served(create_router_app(cfg))


def test_proxies_json_and_sse_round_robin(workers):
    r = start_router([w.url for w in workers])
    try:
        got = [httpx.post(r.url + "/v1/completions", json={"prompt": f"p{i}"}).json() for i in range(4)]
        assert [g["worker"] for g in got] == ["a", "b", "a", "b"] and got[1]["prompt"] == "p1"
        with httpx.stream("POST", r.url + "/v1/completions", json={"prompt": "s", "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in resp.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and len(lines) == 4
        assert httpx.get(r.url + "/v1/models").json()["data"][0]["id"] == "fake"
        metrics = httpx.get(r.url + "/metrics").text
        assert 'kvyard_router:routing_decisions_total{decision="round_robin",policy="round_robin"}' in metrics
        assert f'kvyard_router:requests_total{{route="/v1/completions",worker="{workers[0].url}"}}' in metrics
    finally:
        r.stop()


def test_retries_past_dead_worker_and_reports_it(workers):
    dead = f"http://127.0.0.1:{free_port()}"
    r = start_router([dead, workers[0].url])
    try:
        # the first health check already found it dead; re-add it as healthy to force a failed attempt
        r.server.config.app.state.router.pool.workers[dead].healthy = True
        for i in range(3):
            assert httpx.post(r.url + "/v1/completions", json={"prompt": "x"}).json()["worker"] == "a"
        listed = {w["url"]: w["healthy"] for w in httpx.get(r.url + "/list_workers").json()["workers"]}
        assert listed == {dead: False, workers[0].url: True}
    finally:
        r.stop()


def test_stream_broken_mid_way_ends_with_an_error_event(workers):
    r = start_router([workers[0].url])
    try:
        with httpx.stream("POST", r.url + "/generate", json={"text": "x", "stream": True}) as resp:
            events = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert events[0] == {"text": "par"} and "failed mid-stream" in events[-1]["error"]["message"]
        metrics = httpx.get(r.url + "/metrics").text  # marked unhealthy until its next health check
        assert f'kvyard_router:worker_failures_total{{worker="{workers[0].url}"}} 1.0' in metrics
    finally:
        r.stop()


def test_no_healthy_worker_is_503_with_clear_body():
    r = start_router([f"http://127.0.0.1:{free_port()}"])
    try:
        resp = httpx.post(r.url + "/v1/chat/completions", json={"messages": []})
        assert resp.status_code == 503
        err = resp.json()["error"]
        assert err["type"] == "service_unavailable_error" and "no healthy worker" in err["message"]
        assert httpx.get(r.url + "/health").status_code == 503
    finally:
        r.stop()


def test_add_remove_list_workers_and_api_key(workers):
    r = start_router([], api_key="k")
    key = {"Authorization": "Bearer k"}
    try:
        assert httpx.post(r.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, headers=key).status_code == 503
        assert httpx.post(r.url + "/add_worker", params={"url": "nope"}, headers=key).status_code == 400
        added = httpx.post(r.url + "/add_worker", params={"url": workers[1].url}, headers=key).json()
        assert added == {"success": True, "url": workers[1].url, "healthy": True}
        got = httpx.post(r.url + "/v1/completions", json={"prompt": "x"}, headers=key).json()
        assert got["worker"] == "b" and got["auth"] == "Bearer k"
        assert httpx.get(r.url + "/list_workers", headers=key).json()["urls"] == [workers[1].url]
        assert httpx.post(r.url + "/remove_worker", params={"url": workers[1].url}, headers=key).json()["success"]
        assert httpx.post(r.url + "/remove_worker", params={"url": workers[1].url}, headers=key).status_code == 404
        assert httpx.get(r.url + "/list_workers", headers=key).json()["urls"] == []
    finally:
        r.stop()


def test_unhealthy_worker_comes_back_after_health_check(workers):
    r = start_router([workers[0].url])
    try:
        pool = r.server.config.app.state.router.pool
        pool.mark_failed(pool.workers[workers[0].url], "test")
        deadline = time.time() + 10
        while not pool.workers[workers[0].url].healthy and time.time() < deadline:
            time.sleep(0.05)
        assert pool.workers[workers[0].url].healthy
    finally:
        r.stop()


@pytest.mark.parametrize("argv, field", [(["--worker-urls", "localhost:1"], "worker url"),
                                         (["--cache-threshold", "1.5"], "cache_threshold"),
                                         (["--port", "0"], "port")])
def test_cli_rejects_bad_values_on_one_line(argv, field, capsys):
    from kvyard.cli.router import run_router
    assert run_router(argv) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and "\n" not in err


def test_cli_unknown_policy_lists_choices(capsys):
    from kvyard.cli.router import run_router
    with pytest.raises(SystemExit) as exc:
        run_router(["--policy", "fastest"])
    assert exc.value.code == 2 and "cache_aware" in capsys.readouterr().err
