"""Auth, error bodies, a client that disconnects mid-stream, and 32 concurrent streams."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from openai import AuthenticationError, OpenAI

from conftest import SERVED_NAME


def test_api_key_required_everywhere_but_health(base_url):
    assert requests.get(base_url + "/health").status_code == 200
    for method, path in (("get", "/v1/models"), ("post", "/generate"), ("get", "/get_model_info"),
                         ("get", "/metrics"), ("post", "/v1/chat/completions")):
        r = getattr(requests, method)(base_url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, path
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "API key" in err["message"]
    assert requests.get(base_url + "/v1/models").status_code == 401
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_is_404_with_openai_body(base_url, auth):
    r = requests.get(base_url + "/v1/nope", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def _stream_text(base_url: str, auth: dict, prompt: str, max_tokens: int) -> str:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text = []
    with requests.post(base_url + "/v1/completions", json=body, headers=auth, stream=True, timeout=600) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: "):])
            assert "error" not in event, event
            text.append(event["choices"][0]["text"])
    return "".join(text)


def _idle_and_intact(base_url: str, auth: dict, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = requests.get(base_url + "/debug/kv_integrity", headers=auth).json()
        idle = state["num_running_reqs"] == 0 and state["num_queue_reqs"] == 0 and state["num_api_requests"] == 0
        if idle or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_disconnecting_stream_client_aborts_its_request(base_url, auth):
    body = {"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    r = requests.post(base_url + "/v1/completions", json=body, headers=auth, stream=True, timeout=60)
    lines = r.iter_lines()
    received = 0
    while received < 3:
        received += bool(next(lines))
    r.close()  # hang up mid-stream
    state = _idle_and_intact(base_url, auth)
    assert state["ok"], state["message"]
    assert state["num_running_reqs"] == 0 and state["num_api_requests"] == 0, state


def test_bad_requests_do_not_disturb_a_running_one(base_url, auth):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_stream_text, base_url, auth, "The capital of France is", 8)
        for body in ({"messages": []}, {"messages": [{"role": "user", "content": "x"}], "n": -1},
                     {"messages": [{"role": "user", "content": 5}]}):
            r = requests.post(base_url + "/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 400, r.text
        text = running.result(timeout=600)
    full = requests.post(base_url + "/v1/completions", headers=auth, json={
        "model": SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}).json()
    assert text == full["choices"][0]["text"]


def test_32_concurrent_streams_complete_and_match(base_url, auth):
    prompts = [f"Write the number {i} in words:" for i in range(8)]
    r = requests.post(base_url + "/v1/completions", headers=auth, json={  # one non-streaming batch
        "model": SERVED_NAME, "prompt": prompts, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    expected = {p: c["text"] for p, c in zip(prompts, r.json()["choices"])}
    jobs = [prompts[i % len(prompts)] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(lambda p: _stream_text(base_url, auth, p, 8), jobs))
    for p, text in zip(jobs, texts):
        assert text == expected[p], p
    state = _idle_and_intact(base_url, auth)
    assert state["ok"], state["message"]
