"""SGLang users' client code against `kvyard serve`, written as SGLang's documentation writes it:
the native request objects, custom logit processors, batches, chat round trips, plain curl
bodies, metrics under sglang:*, the dashboard's series, profiling and the ShareGPT benchmark.

The server is started with kvyard.utils' launch_server_cmd / wait_for_server /
terminate_process, as SGLang's notebooks start theirs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from kvyard.utils import launch_server_cmd, terminate_process, wait_for_server

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples/monitoring/grafana/dashboards/kvyard.json"
SHAREGPT = Path(__file__).parent / "data/sharegpt_small.json"


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    profile_dir = tmp_path_factory.mktemp("profiles")
    proc, port = launch_server_cmd(
        f"{sys.executable} -m kvyard.cli serve --model-path {smollm2_path} --dtype float32 "
        "--max-total-tokens 4096 --enable-metrics --enable-sglang-metrics --enable-custom-logit-processor "
        f"--file-storage-path {tmp_path_factory.mktemp('files')} --log-level warning",
        env={"SGLANG_TORCH_PROFILER_DIR": str(profile_dir)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=600, process=proc)
        yield url, profile_dir
    finally:
        terminate_process(proc)
    assert proc.returncode == 0


def test_generate_takes_sglang_request_objects(server):
    url, _ = server
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "log_metrics": True, "lora_path": None, "session_params": None, "return_hidden_states": False,
            "custom_labels": {"team": "x"}, "modalities": [], "image_data": None}
    r = requests.post(url + "/generate", json=body)
    assert r.status_code == 200, r.text
    plain = requests.post(url + "/generate", json={"text": body["text"], "sampling_params": body["sampling_params"]})
    assert r.json()["output_ids"] == plain.json()["output_ids"]
    refused = requests.post(url + "/generate", json={**body, "lora_path": "my-adapter"})
    assert refused.status_code == 400 and "lora_path: LoRA serving is off" in refused.text
    unknown = requests.post(url + "/generate", json={**body, "bogus": 1})
    assert unknown.status_code == 400 and "unknown request field 'bogus'" in unknown.text


def test_custom_logit_processor_by_name(server):
    url, _ = server
    forced = 504
    r = requests.post(url + "/generate", json={
        "text": "Hello", "custom_logit_processor": "force_token",
        "sampling_params": {"max_new_tokens": 3, "temperature": 0.8, "custom_params": {"token_id": forced}}})
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == [forced] * 3
    pickled = requests.post(url + "/generate", json={
        "text": "Hello", "custom_logit_processor": json.dumps({"callable": "gASVKAAAAAAAAACMCF9fbWFpbl9flA=="}),
        "sampling_params": {"max_new_tokens": 2}})
    assert pickled.status_code == 400 and "pickled logit processors are not supported" in pickled.text


def test_plain_curl_body_without_json_content_type(server):
    url, _ = server
    out = subprocess.run(["curl", "-s", url + "/generate", "-d",
                          '{"text": "Hi", "sampling_params": {"max_new_tokens": 2}}'],
                         capture_output=True, text=True, timeout=120)
    assert "output_ids" in out.stdout, out.stdout


def test_function_calling_round_trip_with_null_fields(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="None", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
                {"role": "assistant", "content": "It is sunny.", "tool_calls": None, "function_call": None,
                 "refusal": None, "audio": None},
                {"role": "user", "content": "Thanks!"}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant"


def test_batch_lines_with_sglang_urls(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="None", max_retries=0)
    rows = [{"custom_id": "r1", "method": "POST", "url": "/chat/completions",
             "body": {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3}}]
    f = client.files.create(file=("in.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch


def _metric_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_sglang_names_and_dashboard_series(server):
    url, _ = server
    requests.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    text = requests.get(url + "/metrics").text
    names = _metric_names(text)
    for series in ("num_used_tokens", "gen_throughput", "func_latency_seconds_count", "num_running_reqs",
                   "token_usage", "time_to_first_token_seconds_bucket", "generation_tokens_total"):
        assert f"kvyard:{series}" in names and f"sglang:{series}" in names, series
    assert 'name="generate"' in text   # func_latency_seconds by handler
    queried = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"(?:kvyard|sglang):[a-z0-9_]+", target["expr"]))
    assert len(queried) >= 10
    assert queried <= names, sorted(queried - names)
    assert {q.replace("kvyard:", "sglang:") for q in queried} <= names


def test_start_and_stop_profile(server):
    url, profile_dir = server
    assert requests.post(url + "/start_profile").status_code == 200
    again = requests.post(url + "/start_profile")
    assert again.status_code == 400 and "already running" in again.text
    requests.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 3}})
    r = requests.post(url + "/stop_profile")
    assert r.status_code == 200, r.text
    traces = list(profile_dir.glob("*.trace.json"))
    assert traces and json.loads(traces[0].read_text())["traceEvents"]
    assert requests.post(url + "/stop_profile").status_code == 400


def test_bench_serving_sharegpt_with_profile(server, tmp_path):
    url, profile_dir = server
    before = set(profile_dir.glob("*.trace.json"))
    out_file = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, "-m", "kvyard.cli", "bench", "serving", "--base-url", url,
                        "--dataset-name", "sharegpt", "--dataset-path", str(SHAREGPT), "--num-prompts", "2",
                        "--sharegpt-output-len", "4", "--profile", "--output-file", str(out_file)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads(out_file.read_text().splitlines()[-1])
    assert row["dataset_name"] == "sharegpt" and row["completed"] == 2 and row["total_output_tokens"] == 8
    assert set(profile_dir.glob("*.trace.json")) - before


def test_bench_accuracy_on_a_local_jsonl(server, tmp_path):
    url, _ = server
    out_file = tmp_path / "acc.jsonl"
    r = subprocess.run([sys.executable, "-m", "kvyard.cli", "bench", "accuracy", "--base-url", url,
                        "--data-path", str(ROOT / "examples/accuracy/general_knowledge_mmlu_style.jsonl"),
                        "--style", "mmlu", "--num-shots", "3", "--num-questions", "4",
                        "--output-file", str(out_file)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads(out_file.read_text().splitlines()[-1])
    assert row["num_questions"] == 4 and 0.0 <= row["accuracy"] <= 1.0 and row["invalid"] < 1.0
