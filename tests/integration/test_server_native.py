"""The SGLang-style native endpoints through plain `requests`, and /metrics through
prometheus_client's text parser."""
from __future__ import annotations

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import SERVED_NAME


@pytest.fixture(scope="module")
def post(base_url, auth):
    def call(path: str, body=None, **kw):
        return requests.post(base_url + path, json=body, headers=auth, timeout=300, **kw)
    return call


@pytest.fixture(scope="module")
def get(base_url, auth):
    def call(path: str, **kw):
        return requests.get(base_url + path, headers=auth, timeout=300, **kw)
    return call


def test_generate_single_batch_and_ids(post):
    params = {"max_new_tokens": 6, "temperature": 0}
    one = post("/generate", {"text": "The capital of France is", "sampling_params": params}).json()
    assert set(one) == {"text", "output_ids", "meta_info"} and one["meta_info"]["completion_tokens"] == len(one["output_ids"])
    batch = post("/generate", {"text": ["The capital of France is", "Hello"], "sampling_params": params}).json()
    assert isinstance(batch, list) and batch[0]["output_ids"] == one["output_ids"]
    ids = post("/generate", {"input_ids": [1, 504, 3575], "sampling_params": params, "rid": "my-rid"}).json()
    assert ids["meta_info"]["id"] == "my-rid" and ids["meta_info"]["prompt_tokens"] == 3


def test_generate_stream_is_cumulative_and_ends_with_done(post):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    full = post("/generate", body).json()
    events = [line for line in post("/generate", {**body, "stream": True}, stream=True).iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    outs = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert outs[-1]["text"] == full["text"] and outs[-1]["output_ids"] == full["output_ids"]
    assert all(outs[-1]["text"].startswith(o["text"]) for o in outs)


def test_generate_logprobs(post):
    r = post("/generate", {"text": "Hello there", "sampling_params": {"max_new_tokens": 3, "temperature": 0},
                           "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0,
                           "return_text_in_logprobs": True}).json()
    meta = r["meta_info"]
    assert len(meta["output_token_logprobs"]) == 3 and all(len(t) == 2 for t in meta["output_top_logprobs"])
    lp, tid, text = meta["output_token_logprobs"][0]
    assert tid == r["output_ids"][0] and isinstance(text, str) and lp <= 0
    assert meta["input_token_logprobs"][0][0] is None and len(meta["input_token_logprobs"]) == meta["prompt_tokens"]


def test_generate_bad_input_is_400_naming_field(post):
    r = post("/generate", {"text": "hi", "sampling_params": {"top_k": 0}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = post("/generate", {"text": "hi", "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    r = post("/generate", data=b"{not json", )
    assert r.status_code == 400


def test_over_long_prompt_is_413(post):
    r = post("/generate", {"input_ids": [100] * 2100, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input_ids"


def test_health_and_info(base_url, get):
    assert requests.get(base_url + "/health").status_code == 200  # no key needed
    assert get("/health_generate").status_code == 200
    info = get("/get_model_info").json()
    assert set(info) == {"model_path", "tokenizer_path", "is_generation", "chat_template", "bos_token",
                         "eos_token", "preferred_sampling_params", "weight_version"} and info["is_generation"] is True
    assert info["preferred_sampling_params"] is None and info["weight_version"] == "default"
    server = get("/get_server_info").json()
    assert server["max_total_num_tokens"] == 8192 and server["served_model_name"] == SERVED_NAME
    assert server["api_key"] == "***" and server["versions"]["kvyard"] == server["version"]


def test_flush_cache_and_abort_request(post):
    # flushing is refused while requests run (earlier tests' aborted streams may still be winding
    # down in this shared server): it must succeed once the server is idle
    deadline = time.monotonic() + 60
    r = post("/flush_cache")
    while r.status_code == 400 and time.monotonic() < deadline:
        time.sleep(0.5)
        r = post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert post("/abort_request", {"rid": "no-such-request"}).json() == {"success": True}
    assert post("/abort_request", {}).status_code == 400


def test_update_weights_bad_path_keeps_serving(post, smollm2_path):
    body = {"input_ids": [1, 504, 3575, 282], "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    before = post("/generate", body).json()["output_ids"]
    r = post("/update_weights_from_disk", {"model_path": "/no/such/model"})
    assert r.status_code == 400 and r.json()["success"] is False and r.json()["message"]
    assert post("/generate", body).json()["output_ids"] == before
    r = post("/update_weights_from_disk", {"model_path": smollm2_path})
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert post("/generate", body).json()["output_ids"] == before


def test_encode_on_a_generation_model_is_400(post):
    r = post("/encode", {"text": "hello"})
    assert r.status_code == 400 and "not an embedding model" in r.json()["error"]["message"]


def test_metrics_parse_and_count(base_url, get, post):
    post("/generate", {"text": "Count: one", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    families = {f.name: f for f in text_string_to_metric_families(get("/metrics").text)}
    for name in ("kvyard:prompt_tokens", "kvyard:generation_tokens", "kvyard:num_requests",
                 "kvyard:time_to_first_token_seconds", "kvyard:time_per_output_token_seconds",
                 "kvyard:e2e_request_latency_seconds", "kvyard:num_running_reqs", "kvyard:num_queue_reqs",
                 "kvyard:token_usage", "kvyard:cache_hit_rate"):
        assert name in families, name
    total = {s.name: s.value for s in families["kvyard:generation_tokens"].samples}
    assert total["kvyard:generation_tokens_total"] >= 3
    assert all(s.labels["model_name"] == SERVED_NAME for s in families["kvyard:num_requests"].samples)
