"""`kvyard router` in front of two real `kvyard serve` workers (SmolLM2, loopback): answers equal
to a direct request, cache-aware routing keeps prefix families on one worker, a killed worker
loses no request that had not started, workers added and removed at runtime, 503 when none is left.
The second worker runs `--dp-size 2` (two scheduler replicas, cache-aware dispatch), so the same
pair also checks that data parallelism serves the greedy output of one replica.
The tests share the two workers and run in file order (the last one kills them)."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import free_port, start_server

ROUTER_READY = "kvyard router ready at "
WORKER_ARGS = ["--dtype", "float32", "--max-total-tokens", "4096", "--num-threads", "1",
               "--enable-cache-report", "--log-level", "warning"]


class Router:
    def __init__(self, urls, policy):
        self.url = ""
        self.proc = subprocess.Popen([sys.executable, "-m", "kvyard.cli", "router", "--worker-urls", *urls,
                                      "--policy", policy, "--port", str(free_port()),
                                      "--health-check-interval-secs", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            if line.startswith(ROUTER_READY):
                self.url = line[len(ROUTER_READY):].strip()
                break
        assert self.url, "the router did not start"
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(30) == 0


@pytest.fixture(scope="module")
def workers(smollm2_path):
    with cf.ThreadPoolExecutor(2) as ex:
        servers = list(ex.map(lambda extra: start_server(["--model-path", smollm2_path, "--port", str(free_port()),
                                                          *WORKER_ARGS, *extra]),
                              [[], ["--dp-size", "2", "--load-balance-method", "cache_aware"]]))
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


def kill_hard(server) -> None:
    """SIGKILL the API process and its scheduler child (a crash, no graceful drain)."""
    children = children_of(server.proc.pid)
    server.proc.kill()
    server.proc.wait(10)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children_of(pid: int) -> list[int]:
    """Direct children from /proc (the scheduler processes of a `kvyard serve`)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return out


def chat(client_or_url, content, **kw):
    from openai import OpenAI
    c = OpenAI(base_url=client_or_url + "/v1", api_key="none", max_retries=0, timeout=300)
    return c.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                     temperature=0, max_tokens=8, **kw)


def test_openai_sdk_through_router_equals_direct(workers):
    router = Router([w.url for w in workers], "cache_aware")
    try:
        direct = chat(workers[0].url, "Name a colour.").choices[0].message.content
        routed = chat(router.url, "Name a colour.").choices[0].message.content
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chat(router.url, "Name a colour.", stream=True)
                           if ch.choices)
        assert direct and routed == direct == streamed
    finally:
        router.stop()


def test_dp2_worker_serves_the_greedy_output_of_dp1(workers):
    prompts = ["The capital of France is", "1, 2, 3,", "Hello, my name is", "The capital of France is a"]

    def complete(url):
        with cf.ThreadPoolExecutor(4) as ex:  # concurrent: the replicas share the load
            return list(ex.map(lambda p: httpx.post(url + "/v1/completions", timeout=300, json={
                "model": "m", "prompt": p, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"], prompts))

    assert complete(workers[1].url) == complete(workers[0].url)


def _cached_share(router_url: str, tag: str) -> tuple[float, dict]:
    """Three prefix families, four requests each, family after family; -> (cached/prompt tokens,
    {family: workers that served it})."""
    cached = prompt = 0
    served: dict[int, set] = {}
    for f in range(3):
        system = f"[{tag} family {f}] You are assistant number {f}. " + f"Rule {f}: answer briefly. " * 20
        for q in range(4):
            r = httpx.post(router_url + "/v1/completions", timeout=300, json={
                "model": "m", "prompt": system + f"Question {q}: what is {q} plus {f}?", "max_tokens": 1,
                "temperature": 0})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            prompt += usage["prompt_tokens"]
            served.setdefault(f, set()).add(r.headers["x-kvyard-worker"])
    return cached / prompt, served


def test_cache_aware_keeps_prefix_families_on_one_worker(workers):
    urls = [w.url for w in workers]
    rr, ca = Router(urls, "round_robin"), Router(urls, "cache_aware")
    try:
        rr_share, rr_served = _cached_share(rr.url, "rr")
        ca_share, ca_served = _cached_share(ca.url, "ca")
        metrics = httpx.get(ca.url + "/metrics").text
    finally:
        rr.stop(), ca.stop()
    print(f"cached_tokens share: cache_aware {ca_share:.3f}, round_robin {rr_share:.3f}")
    assert all(len(ws) == 1 for ws in ca_served.values()), ca_served
    assert all(len(ws) == 2 for ws in rr_served.values()), rr_served
    assert ca_share > rr_share, (ca_share, rr_share)
    assert 'decision="cache_hit"' in metrics and "kvyard_router:prefix_hit_estimate" in metrics


def test_add_and_remove_worker_at_runtime(workers):
    router = Router([workers[0].url], "round_robin")
    try:
        assert httpx.post(router.url + "/add_worker", params={"url": workers[1].url}).json()["healthy"]
        served = {httpx.post(router.url + "/generate", timeout=300, json={
            "text": "Hi", "sampling_params": {"max_new_tokens": 1}}).headers["x-kvyard-worker"] for _ in range(2)}
        assert served == {workers[0].url, workers[1].url}
        assert httpx.post(router.url + "/remove_worker", params={"url": workers[0].url}).status_code == 200
        assert httpx.get(router.url + "/list_workers").json()["urls"] == [workers[1].url]
        r = httpx.post(router.url + "/generate", timeout=300, json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}})
        assert r.headers["x-kvyard-worker"] == workers[1].url
    finally:
        router.stop()


def test_killed_worker_loses_no_request_then_503(workers):
    router = Router([w.url for w in workers], "round_robin")
    try:
        def one(i):
            return httpx.post(router.url + "/v1/completions", timeout=300, json={
                "model": "m", "prompt": f"Count to ten, attempt {i}:", "max_tokens": 12, "temperature": 0,
                "ignore_eos": True})

        with cf.ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(one, i) for i in range(8)]
            time.sleep(1.0)
            kill_hard(workers[1])
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200] * 8, [r.text for r in results if r.status_code != 200]
        assert all(r.json()["usage"]["completion_tokens"] == 12 for r in results)
        listed = {w["url"]: w["healthy"] for w in httpx.get(router.url + "/list_workers").json()["workers"]}
        assert listed == {workers[0].url: True, workers[1].url: False}
        retried = [ln for ln in httpx.get(router.url + "/metrics").text.splitlines()
                   if ln.startswith("kvyard_router:retries_total")]
        assert float(retried[0].split()[-1]) >= 1, "no request was in flight on the killed worker"
        kill_hard(workers[0])
        r = httpx.post(router.url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and "no healthy worker" in r.json()["error"]["message"]
    finally:
        router.stop()
