"""/v1/files and /v1/batches end to end through the official openai SDK."""
from __future__ import annotations

import json
import time

import pytest
from openai import NotFoundError

from conftest import SERVED_NAME


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _wait(client, batch_id: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired") or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def test_files_roundtrip(client):
    data = _jsonl([{"hello": "wörld"}])
    f = client.files.create(file=("x.jsonl", data), purpose="batch")
    assert f.bytes == len(data) and f.filename == "x.jsonl"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == data
    assert f.id in [g.id for g in client.files.list().data]
    assert client.files.delete(f.id).deleted
    with pytest.raises(NotFoundError):
        client.files.retrieve(f.id)


def test_chat_batch_end_to_end(client):
    questions = ["What is 2+2?", "Name a fruit.", "Say hello."]
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": SERVED_NAME, "messages": [{"role": "user", "content": q}], "max_tokens": 6,
                      "temperature": 0}} for i, q in enumerate(questions)]
    rows.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": SERVED_NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -3}})
    f = client.files.create(file=("in.jsonl", _jsonl(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = _wait(client, batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 3, 1)
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["q0", "q1", "q2"]
    live = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": questions[0]}],
                                          max_tokens=6, temperature=0)
    q0 = next(r for r in out if r["custom_id"] == "q0")
    assert q0["response"]["status_code"] == 200
    assert q0["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert errors[0]["custom_id"] == "bad" and errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
    assert batch.id in [b.id for b in client.batches.list().data]


def test_batch_with_a_malformed_line_fails_validation(client):
    data = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n'
    f = client.files.create(file=("bad.jsonl", data), purpose="batch")
    batch = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
    assert batch.status == "failed"
    assert {e.line for e in batch.errors.data} == {1, 2}


def test_batch_cancel(client):
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True}}
            for i in range(2)]
    f = client.files.create(file=("long.jsonl", _jsonl(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert _wait(client, batch.id).status == "cancelled"


def test_unknown_batch_and_file_are_404(client):
    with pytest.raises(NotFoundError):
        client.batches.retrieve("batch_" + "0" * 32)
    with pytest.raises(NotFoundError):
        client.files.content("file-" + "0" * 32)
