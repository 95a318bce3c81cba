"""Schemathesis against the server's own /openapi.json: for a bounded number of generated
requests per operation (the documented examples, valid and invalid fuzzed ones), no 5xx, every
status documented, and every response body valid for its documented schema (success bodies are
the response models of core/server/response_models.py, errors the error body).

It runs on the limits server (small context and KV pool) with the admin key, so the admin routes
are fuzzed too; openapi_fuzz_hooks.py keeps every generation a few tokens long. The routes a
fuzzer cannot reach with valid data (a batch needs an uploaded file, /v1/models/{model} the
served name) are walked through by hand and their answers checked against the same schema."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import ADMIN_KEY, API_KEY, assert_documented

HOOKS = Path(__file__).with_name("openapi_fuzz_hooks.py")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
KEY = {"Authorization": f"Bearer {API_KEY}"}


def run_schemathesis(url: str, examples: int, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
           "-H", f"Authorization: Bearer {ADMIN_KEY}", "--phases", "examples,fuzzing", "--checks", CHECKS,
           "-n", str(examples), "--generation-deterministic", "--request-timeout", "300",
           "--continue-on-failure", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=cwd, env=env)  # its cache stays out of the repo
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.split("SUMMARY")[-1]
    assert "passed" in summary and " failed" not in summary, run.stdout[-3000:]
    assert "Examples" in summary and "Fuzzing" in summary, summary    # both phases ran


def test_schemathesis_finds_no_server_error_and_no_schema_violation(limits_server, tmp_path):
    run_schemathesis(limits_server.url, 6, tmp_path)


@pytest.mark.slow
def test_schemathesis_with_many_examples_per_operation(limits_server, tmp_path):
    run_schemathesis(limits_server.url, 60, tmp_path)


def test_files_batches_and_models_answer_as_documented(limits_server):
    url = limits_server.url
    spec = requests.get(url + "/openapi.json", headers=KEY, timeout=30).json()

    def call(method: str, path: str, route: str = "", **kw) -> requests.Response:
        r = requests.request(method, url + path, headers=KEY, timeout=120, **kw)
        assert_documented(spec, method, route or path, r)
        return r

    models = call("GET", "/v1/models").json()
    assert call("GET", "/v1/models/" + models["data"][0]["id"], "/v1/models/{model_id}").status_code == 200
    assert call("GET", "/v1/models/no-such-model", "/v1/models/{model_id}").status_code == 404
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "Hi", "max_tokens": 2}}
    file_id = call("POST", "/v1/files", files={"file": ("b.jsonl", json.dumps(line).encode() + b"\n")},
                   data={"purpose": "batch"}).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/completions"}
    batch_id = call("POST", "/v1/batches", json=body).json()["id"]
    assert call("GET", f"/v1/batches/{batch_id}", "/v1/batches/{batch_id}").json()["id"] == batch_id
    call("POST", f"/v1/batches/{batch_id}/cancel", "/v1/batches/{batch_id}/cancel")
    assert batch_id in [b["id"] for b in call("GET", "/v1/batches").json()["data"]]
    assert call("GET", "/v1/batches/batch_nope", "/v1/batches/{batch_id}").status_code == 404
    assert call("DELETE", f"/v1/files/{file_id}", "/v1/files/{file_id}").json()["deleted"] is True
