"""Schemathesis against the server's own /openapi.json: for a bounded number of generated
requests per operation (valid and invalid ones), no 5xx, every status documented, and every
response body valid for its documented schema.

It runs on the limits server (small context and KV pool, so no generated request can keep the
CPU busy for long) with the admin key, so the admin routes are fuzzed too."""
from __future__ import annotations

import subprocess
import sys

from conftest import ADMIN_KEY

EXAMPLES_PER_OPERATION = 8
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(limits_server, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", limits_server.url + "/openapi.json",
           "-H", f"Authorization: Bearer {ADMIN_KEY}", "--phases", "examples,fuzzing", "--checks", CHECKS,
           "-n", str(EXAMPLES_PER_OPERATION), "--generation-deterministic", "--request-timeout", "300",
           "--continue-on-failure", "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its cache stays out of the repo
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and " failed" not in run.stdout.split("SUMMARY")[-1], run.stdout[-3000:]
