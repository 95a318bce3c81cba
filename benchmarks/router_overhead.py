"""Router overhead on loopback: the latency `kvyard router` adds to a request and its throughput,
against a trivial backend (a tiny FastAPI echo server this script starts), so the numbers are the
router's own cost, not a model's.

    python benchmarks/router_overhead.py [--requests 2000] [--concurrency 32] [--policy cache_aware]

1. latency: ``--requests`` sequential POST /v1/completions, direct to the echo server and through
   the router; p50/p99 of each and of the difference (added latency).
2. throughput: the same requests with ``--concurrency`` in flight, direct and through the router
   (requests/s). Every process here (client, router, echo) shares the machine's cores.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx

from kvyard.utils import free_port

ECHO_APP = """
from fastapi import FastAPI, Request
app = FastAPI()
@app.get("/health")
async def health():
    return {}
@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    return {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": body["prompt"][-8:],
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
"""


def spawn(cmd: list[str], health_url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def body(i: int) -> dict:
    return {"model": "m", "prompt": f"You are a helpful assistant. Family {i % 16}. Question {i}.", "max_tokens": 1}


async def sequential(url: str, n: int) -> list[float]:
    async with httpx.AsyncClient() as c:
        for i in range(20):  # warm the connection pools
            await c.post(url, json=body(i))
        out = []
        for i in range(n):
            t = time.perf_counter()
            r = await c.post(url, json=body(i))
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        return out


async def concurrent(url: str, n: int, concurrency: int) -> float:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as c:
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                r = await c.post(url, json=body(i))
                assert r.status_code == 200, r.text
        await asyncio.gather(*(one(i) for i in range(50)))
        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t)


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--policy", default="cache_aware")
    a = ap.parse_args()
    echo_port, router_port = free_port(), free_port()
    echo_url, router_url = f"http://127.0.0.1:{echo_port}", f"http://127.0.0.1:{router_port}"
    env_py = [sys.executable, "-c"]
    echo = spawn([*env_py, ECHO_APP + f"\nimport uvicorn; uvicorn.run(app, host='127.0.0.1', port={echo_port}, "
                  "log_level='error', access_log=False)"], echo_url + "/health")
    router = spawn([sys.executable, "-m", "kvyard.cli", "router", "--worker-urls", echo_url, "--policy", a.policy,
                    "--port", str(router_port)], router_url + "/health")
    try:
        direct = asyncio.run(sequential(echo_url + "/v1/completions", a.requests))
        routed = asyncio.run(sequential(router_url + "/v1/completions", a.requests))
        rps_direct = asyncio.run(concurrent(echo_url + "/v1/completions", a.requests, a.concurrency))
        rps_routed = asyncio.run(concurrent(router_url + "/v1/completions", a.requests, a.concurrency))
    finally:
        for p in (router, echo):
            p.send_signal(signal.SIGINT)
            p.wait(20)
    print(f"policy {a.policy}, {a.requests} requests, {os.cpu_count()} CPUs")
    print(f"latency direct  p50 {pct(direct, .5):.2f} ms  p99 {pct(direct, .99):.2f} ms")
    print(f"latency routed  p50 {pct(routed, .5):.2f} ms  p99 {pct(routed, .99):.2f} ms")
    print(f"added by router p50 {pct(routed, .5) - pct(direct, .5):.2f} ms  p99 {pct(routed, .99) - pct(direct, .99):.2f} ms"
          f"  (mean {(statistics.mean(routed) - statistics.mean(direct)) * 1e3:.2f} ms)")
    print(f"throughput (concurrency {a.concurrency}): direct {rps_direct:.0f} req/s, routed {rps_routed:.0f} req/s")


if __name__ == "__main__":
    main()
