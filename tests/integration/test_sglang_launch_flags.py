"""SGLang launch flags kvyard honours, driven as SGLang's docs drive them: a server started with
the flags (hidden_states_server.py's --enable-return-hidden-states, and --enable-mixed-chunk,
--prefill-only-one-req, --decode-log-interval, --show-time-cost, --download-dir), the client
code of the docs (requests.post to /generate), then what each flag promises: hidden states equal
to transformers' final-norm output, greedy outputs equal to transformers with mixed batches, the
batch log lines at the cadence asked, the model found in the download dir; --weight-version,
--preferred-sampling-params (/get_model_info) and --bucket-time-to-first-token (/metrics)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
import torch

from conftest import free_port, start_server


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")       # --download-dir DIR, --model-path <id in DIR>
    (downloads / "smollm2").mkdir()
    os.symlink(smollm2_path, downloads / "smollm2" / os.path.basename(smollm2_path))
    server = start_server([
        "--download-dir", str(downloads), "--model-path", "smollm2", "--dtype", "float32",
        "--max-total-tokens", "4096", "--port", str(free_port()), "--num-threads", "2",
        "--enable-return-hidden-states", "--enable-mixed-chunk", "--prefill-only-one-req",
        "--decode-log-interval", "2", "--show-time-cost", "--disable-radix-cache", "--log-level", "info",
        "--enable-metrics", "--bucket-time-to-first-token", "0.5", "2", "30", "--weight-version", "v1",
        "--preferred-sampling-params", '{"temperature": 0.6}'])
    yield server
    assert server.stop() == 0, server.output()


PROMPTS = ["Hello, my name is", "The capital of France is", "The future of AI is"]


def test_return_hidden_states_as_sglang_docs_read_them(server, hf_smollm2):
    model, tokenizer = hf_smollm2
    json_data = {"text": PROMPTS[:2], "sampling_params": {"temperature": 0, "max_new_tokens": 4},
                 "return_hidden_states": True}
    outputs = requests.post(f"{server.url}/generate", json=json_data, timeout=300).json()
    for prompt, output in zip(PROMPTS, outputs):
        states = output["meta_info"]["hidden_states"]
        assert len(states) == output["meta_info"]["completion_tokens"] == 4
        hidden = torch.cat([torch.tensor(i).unsqueeze(0) if torch.tensor(i).dim() == 1 else torch.tensor(i)
                            for i in states])   # the docs' concatenation: prompt rows, then one per token
        ids = tokenizer.encode(prompt) + output["output_ids"][:-1]
        with torch.inference_mode():
            ref = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(hidden, ref, atol=2e-3, rtol=1e-3)
    plain = requests.post(f"{server.url}/generate", json={**json_data, "return_hidden_states": False}).json()
    assert all("hidden_states" not in o["meta_info"] for o in plain)


def test_streamed_hidden_states_are_cumulative(server):
    body = {"text": PROMPTS[0], "sampling_params": {"temperature": 0, "max_new_tokens": 3},
            "return_hidden_states": True, "stream": True}
    events = []
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                events.append(json.loads(line[5:]))
    counts = [len(e["meta_info"]["hidden_states"]) for e in events]
    assert counts == sorted(counts) and counts[-1] == 3 and len(events) >= 2
    final = requests.post(f"{server.url}/generate", json={**body, "stream": False}).json()
    assert events[-1]["meta_info"]["hidden_states"] == final["meta_info"]["hidden_states"]


def test_mixed_chunks_keep_greedy_outputs_and_log_as_asked(server, hf_smollm2, hf_greedy):
    model, tokenizer = hf_smollm2
    params = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    start = len(server.lines)
    outputs = requests.post(f"{server.url}/generate", json={"text": PROMPTS, "sampling_params": params},
                            timeout=300).json()
    for prompt, output in zip(PROMPTS, outputs):
        assert output["output_ids"] == hf_greedy(model, tokenizer.encode(prompt), 6)
    lines = server.lines[start:]
    prefills = [ln for ln in lines if "Prefill batch." in ln]
    assert len(prefills) == 3 and all("#new-seq: 1," in ln for ln in prefills)    # --prefill-only-one-req
    assert any("#mixed-decode: " in ln for ln in prefills)                         # --enable-mixed-chunk
    decodes = [ln for ln in lines if "Decode batch." in ln]
    assert 2 <= len(decodes) <= 6 // 2 + 1                                           # every 2 decode batches
    assert sum("Time cost (ms): schedule" in ln for ln in lines) == len(prefills) + len(decodes)


def test_unknown_model_in_download_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvyard.cli", "serve", "--download-dir", str(tmp_path),
                        "--model-path", "org/missing"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"{tmp_path}/org/missing" in r.stderr and "never downloads" in r.stderr


def test_model_info_and_metric_buckets(server):
    info = requests.get(f"{server.url}/get_model_info", timeout=60).json()
    assert info["preferred_sampling_params"] == {"temperature": 0.6} and info["weight_version"] == "v1"
    assert requests.get(f"{server.url}/get_weight_version", timeout=60).json() == {"weight_version": "v1"}
    requests.post(f"{server.url}/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}, timeout=300)
    metrics = requests.get(f"{server.url}/metrics", timeout=60).text
    bounds = [line.split('le="')[1].split('"')[0] for line in metrics.splitlines()
              if line.startswith("kvyard:time_to_first_token_seconds_bucket")]
    assert bounds == ["0.5", "2.0", "30.0", "+Inf"]
