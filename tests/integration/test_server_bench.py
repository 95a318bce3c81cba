"""`kvyard bench serving` against the real server, both backends, a tiny workload."""
from __future__ import annotations

import json

import pytest

from conftest import API_KEY


@pytest.mark.parametrize("backend", ["kvyard", "openai"])
def test_bench_serving_reports_every_request(base_url, tmp_path, backend):
    from kvyard.bench.serving import main

    out = tmp_path / "bench.jsonl"
    rc = main(["--backend", backend, "--base-url", base_url, "--api-key", API_KEY, "--num-prompts", "4",
               "--random-input-len", "16", "--random-output-len", "4", "--random-range-ratio", "0.5",
               "--request-rate", "20", "--max-concurrency", "2", "--output-file", str(out)])
    assert rc == 0
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["completed"] == 4 and row["failed"] == 0, row["errors"]
    assert 4 <= row["total_output_tokens"] <= 16 and row["total_input_tokens"] >= 4 * 8
    assert row["mean_ttft_ms"] > 0 and row["p99_e2e_latency_ms"] >= row["median_e2e_latency_ms"] > 0
    assert row["output_throughput"] > 0 and row["request_throughput"] > 0


def test_bench_serving_bad_flag_is_one_line(capsys):
    from kvyard.bench.serving import main

    assert main(["--num-prompts", "0", "--vocab-size", "100"]) == 1
    assert "num_prompts must be >= 1" in capsys.readouterr().err
