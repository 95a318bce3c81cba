"""Stopping and killing the server: a running batch keeps its finished lines and resumes after a
restart, the scheduler process ends with the API process (even after kill -9), the IPC folder
goes with them, and an exposed server without a key is warned about."""
from __future__ import annotations

import glob
import json
import os
import signal
import tempfile
import time

import requests

from conftest import free_port, start_server

LINES = 12


def _server(model: str, storage: str, host: str = "127.0.0.1"):
    return start_server(["--model-path", model, "--dtype", "float32", "--max-total-tokens", "4096",
                         "--host", host, "--port", str(free_port()), "--file-storage-path", storage,
                         "--num-threads", "1", "--log-level", "warning", "--skip-server-warmup"])


def _children(pid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ipc_dirs(pid: int) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"kvyard-{pid}-*"))


def _batch(url: str, batch_id: str) -> dict:
    return requests.get(f"{url}/v1/batches/{batch_id}", timeout=30).json()


def _wait(url: str, batch_id: str, done, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = _batch(url, batch_id)
        if done(batch) or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)


def test_batch_survives_a_restart_and_the_scheduler_dies_with_its_parent(smollm2_path, tmp_path):
    storage = str(tmp_path / "store")
    first = _server(smollm2_path, storage, host="0.0.0.0")
    try:
        assert any("without --api-key" in line for line in first.lines), first.output()
        lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": f"Count to {i}:", "max_tokens": 2 + 12 * i, "temperature": 0, "ignore_eos": True}}
                 for i in range(LINES)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file_id = requests.post(first.url + "/v1/files", files={"file": ("b.jsonl", data)},
                                data={"purpose": "batch"}, timeout=60).json()["id"]
        batch_id = requests.post(first.url + "/v1/batches", json={
            "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}, timeout=60).json()["id"]
        batch = _wait(first.url, batch_id, lambda b: b["request_counts"]["completed"] >= 2)
        assert batch["status"] == "in_progress" and batch["request_counts"]["completed"] < LINES, batch
    finally:
        assert first.stop() == 0, first.output()
    assert not _ipc_dirs(first.proc.pid)                       # a clean stop removes the IPC folder

    second = _server(smollm2_path, storage)
    try:
        kept = _batch(second.url, batch_id)
        assert kept["request_counts"]["completed"] >= 2, kept      # what finished before the stop is kept
        batch = _wait(second.url, batch_id, lambda b: b["status"] not in ("validating", "in_progress", "finalizing"))
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        output = requests.get(f"{second.url}/v1/files/{batch['output_file_id']}/content", timeout=60).text
        rows = [json.loads(r) for r in output.splitlines()]
        assert sorted(r["custom_id"] for r in rows) == sorted(f"line-{i}" for i in range(LINES))
        for row in rows:
            i = int(row["custom_id"].split("-")[1])
            assert row["response"]["body"]["usage"]["completion_tokens"] == 2 + 12 * i
        scheduler = [p for p in _children(second.proc.pid) if _alive(p) and b"spawn_main" in _cmdline(p)]
        assert scheduler and _ipc_dirs(second.proc.pid)
    finally:
        second.proc.send_signal(signal.SIGKILL)                 # the API process dies without a goodbye
        second.proc.wait(30)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in scheduler) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in scheduler), "the scheduler outlived the API process"
    assert not _ipc_dirs(second.proc.pid)
