"""/v1/files and /v1/batches: OpenAI's batch API on an on-disk store.

A batch reads its input JSONL file ({"custom_id", "method", "url", "body"} per line), runs every
line in the background through the same handlers as the HTTP endpoints (so through the same
TokenizerManager and scheduler as live traffic), and writes an output file (2xx responses) and
an error file (the rest). Batch objects are JSON files under ``<root>/batches``.

Nothing finished is lost: each line's result is appended to the batch's journal
(``<batch_id>.results.jsonl``, one ``{"line", "result"}`` per finished line, flushed at once)
the moment it completes. A batch still running when the server stops stays ``in_progress`` and
resumes at the next start with the lines its journal lacks. A cancelled batch, as in OpenAI's
API, gets output/error files with what finished and request_counts of completed and failed
lines. Invariant: completed + failed == lines in the journal.

Status: validating -> in_progress -> finalizing -> completed, or failed, or cancelling -> cancelled.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from kvyard.errors import EngineDeadError, RequestError
from kvyard.server.context import ctx_of
from kvyard.server.errors import error_body
from kvyard.server.file_store import FILE_PURPOSES, FileStore, _write_atomic, parse_multipart
from kvyard.server.protocol import BatchCreateRequest, ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from kvyard.server.response_models import Batch, BatchList, Deleted, FileList, FileObject, ok

logger = logging.getLogger(__name__)

MAX_CONCURRENT_LINES = 64      # in flight per batch; the scheduler batches them
_BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}$")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


class BatchRunner:
    def __init__(self, ctx, files: FileStore, root: str):
        self.ctx = ctx
        self.files = files
        self.dir = os.path.join(root, "batches")
        os.makedirs(self.dir, exist_ok=True)
        self._tasks: dict[str, asyncio.Task] = {}
        self._closing = False

    # -- store -----------------------------------------------------------------------------
    def _path(self, batch_id: str) -> str:
        if not _BATCH_ID.match(batch_id):
            raise RequestError(f"batch_id: no batch {batch_id!r}", param="batch_id", status=404)
        return os.path.join(self.dir, batch_id + ".json")

    def get(self, batch_id: str) -> dict:
        path = self._path(batch_id)
        if not os.path.exists(path):
            raise RequestError(f"batch_id: no batch {batch_id!r}", param="batch_id", status=404)
        with open(path) as fh:
            return json.load(fh)

    def _save(self, batch: dict) -> dict:
        _write_atomic(self._path(batch["id"]), json.dumps(batch).encode())
        return batch

    def _update(self, batch_id: str, **changes: Any) -> dict:
        return self._save({**self.get(batch_id), **changes})

    def list(self) -> list[dict]:
        ids = [n[:-5] for n in os.listdir(self.dir) if n.endswith(".json") and _BATCH_ID.match(n[:-5])]
        return sorted((self.get(i) for i in ids), key=lambda b: b["created_at"], reverse=True)

    def recover(self) -> None:
        """Batches a previous server process left active: resume them (the lines their journal
        lacks), or finish a cancel that was under way with what had finished."""
        for batch in self.list():
            if batch["status"] not in ACTIVE or batch["id"] in self._tasks:
                continue
            if batch["status"] == "cancelling":
                self._finish(batch["id"], status="cancelled")
            else:
                logger.info("resuming batch %s", batch["id"])
                self._start(batch["id"])

    # -- journal of finished lines ---------------------------------------------------------
    def _journal(self, batch_id: str) -> str:
        return os.path.join(self.dir, batch_id + ".results.jsonl")

    def _append_result(self, batch_id: str, index: int, result: dict) -> None:
        with open(self._journal(batch_id), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"line": index, "result": result}, ensure_ascii=False) + "\n")
            fh.flush()

    def _finished_lines(self, batch_id: str) -> dict[int, dict]:
        """line index -> result, from the journal (a torn last line from a crash is skipped)."""
        done: dict[int, dict] = {}
        if os.path.exists(self._journal(batch_id)):
            with open(self._journal(batch_id), encoding="utf-8") as fh:
                for raw in fh:
                    try:
                        entry = json.loads(raw)
                    except json.JSONDecodeError:
                        continue
                    done[entry["line"]] = entry["result"]
        return done

    # -- lifecycle -------------------------------------------------------------------------
    def create(self, req: BatchCreateRequest) -> dict:
        self.files.get(req.input_file_id)  # 404 when missing
        now = int(time.time())
        batch = {"id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": req.endpoint, "errors": None,
                 "input_file_id": req.input_file_id, "completion_window": req.completion_window,
                 "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
                 "in_progress_at": None, "expires_at": now + 24 * 3600, "finalizing_at": None,
                 "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
                 "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": req.metadata}
        self._save(batch)
        self._start(batch["id"])
        return batch

    def _start(self, batch_id: str) -> None:
        task = asyncio.ensure_future(self._run(batch_id))
        task.add_done_callback(lambda _: self._settle(batch_id))
        self._tasks[batch_id] = task

    def _settle(self, batch_id: str) -> None:
        """A task cancelled before it ever ran never reached _run's handlers: settle it here.
        A server that stops leaves the batch active, to resume at the next start."""
        self._tasks.pop(batch_id, None)
        if self.get(batch_id)["status"] in ACTIVE and not self._closing:
            self._finish(batch_id, status="cancelled")

    def cancel(self, batch_id: str) -> dict:
        batch = self.get(batch_id)
        if batch["status"] not in ("validating", "in_progress"):
            return batch
        batch = self._update(batch_id, status="cancelling", cancelling_at=int(time.time()))
        task = self._tasks.get(batch_id)
        if task is not None:
            task.cancel()
        return batch

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, batch_id: str) -> None:
        try:
            lines = self._parse_input(batch_id)
            if lines is None:
                return
            done = self._finished_lines(batch_id)
            batch = self.get(batch_id)
            self._update(batch_id, status="in_progress", in_progress_at=batch["in_progress_at"] or int(time.time()),
                         request_counts=_counts(len(lines), done.values()))
            gate = asyncio.Semaphore(MAX_CONCURRENT_LINES)
            await asyncio.gather(*(self._run_line(batch_id, i, line, gate)
                                   for i, line in enumerate(lines) if i not in done))
            self._update(batch_id, status="finalizing", finalizing_at=int(time.time()))
            self._finish(batch_id, status="completed")
        except asyncio.CancelledError:
            if not self._closing:  # the user's cancel; a stopping server leaves it to resume
                self._finish(batch_id, status="cancelled")
        except Exception as exc:  # a bug: fail the batch, keep the server
            logger.exception("batch %s failed", batch_id)
            self._update(batch_id, status="failed", failed_at=int(time.time()),
                         errors=_errors("internal_error", f"{type(exc).__name__}: {exc}"))

    def _parse_input(self, batch_id: str) -> Optional[list[dict]]:
        """The input lines, or None after marking the batch failed (with one error per bad line)."""
        batch = self.get(batch_id)
        text = self.files.content(batch["input_file_id"]).decode("utf-8", errors="replace")
        lines, problems = [], []
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(("invalid_json_line", f"line {number}: not JSON ({exc.msg})", number))
                continue
            if isinstance(line, dict) and isinstance(line.get("url"), str) and not line["url"].startswith("/v1/"):
                line["url"] = "/v1" + line["url"]   # SGLang's docs write "/chat/completions"
            problem = _line_problem(line, batch["endpoint"])
            if problem:
                problems.append(("invalid_request", f"line {number}: {problem}", number))
            lines.append(line)
        if not lines and not problems:
            problems.append(("empty_file", "the input file has no requests", None))
        if problems:
            data = [{"code": c, "message": m, "param": None, "line": n} for c, m, n in problems]
            self._update(batch_id, status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": data})
            return None
        return lines

    async def _run_line(self, batch_id: str, index: int, line: dict, gate: asyncio.Semaphore) -> None:
        async with gate:
            status, body = await self._call(line["url"], line["body"])
        request_id = f"batch_req_{uuid.uuid4().hex}"
        result = {"id": request_id, "custom_id": line["custom_id"],
                  "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}
        self._append_result(batch_id, index, result)   # on disk before it is counted
        counts = dict(self.get(batch_id)["request_counts"])
        counts["completed" if status == 200 else "failed"] += 1
        self._update(batch_id, request_counts=counts)

    async def _call(self, url: str, body: dict) -> tuple[int, dict]:
        """One line through the endpoint's handler: (HTTP status, response body)."""
        from kvyard.server.openai_chat import chat_completion
        from kvyard.server.openai_completions import completion, embeddings

        handlers = {"/v1/chat/completions": (ChatCompletionRequest, chat_completion),
                    "/v1/completions": (CompletionRequest, completion),
                    "/v1/embeddings": (EmbeddingRequest, embeddings)}
        model_cls, handler = handlers[url]
        try:
            req = model_cls(**body)
            if getattr(req, "stream", False):
                raise RequestError("stream: batch requests cannot stream", param="stream")
            return 200, await handler(self.ctx, req)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            return 400, error_body(400, f"{param}: {first['msg']}", param)
        except RequestError as exc:
            return exc.status, error_body(exc.status, exc.message, exc.param)
        except EngineDeadError as exc:
            return 503, error_body(503, f"the engine is not running: {exc}")

    def _finish(self, batch_id: str, status: str) -> None:
        """Output and error files from the journal (in input order), then the final status."""
        done = self._finished_lines(batch_id)
        results = [done[i] for i in sorted(done)]
        ok = [r for r in results if r["response"]["status_code"] == 200]
        bad = [r for r in results if r["response"]["status_code"] != 200]
        batch = self.get(batch_id)
        out_id = self._write_results(batch_id, "output", ok)
        err_id = self._write_results(batch_id, "errors", bad)
        stamp = "completed_at" if status == "completed" else "cancelled_at"
        counts = _counts(batch["request_counts"]["total"], results)
        self._save({**batch, "status": status, stamp: int(time.time()), "output_file_id": out_id,
                    "error_file_id": err_id, "request_counts": counts})
        if os.path.exists(self._journal(batch_id)):
            os.remove(self._journal(batch_id))

    def _write_results(self, batch_id: str, kind: str, rows: list[dict]) -> Optional[str]:
        if not rows:
            return None
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        return self.files.create(f"{batch_id}_{kind}.jsonl", "batch_output", data)["id"]


def _line_problem(line: Any, endpoint: str) -> Optional[str]:
    if not isinstance(line, dict):
        return "must be a JSON object"
    if not isinstance(line.get("custom_id"), str):
        return "custom_id: must be a string"
    if line.get("method", "POST") != "POST":
        return "method: must be POST"
    if line.get("url") != endpoint:
        return f"url: must be the batch's endpoint {endpoint}, got {line.get('url')!r}"
    if not isinstance(line.get("body"), dict):
        return "body: must be an object"
    return None


def _counts(total: int, results) -> dict:
    results = list(results)
    completed = sum(r["response"]["status_code"] == 200 for r in results)
    return {"total": total, "completed": completed, "failed": len(results) - completed}


def _errors(code: str, message: str) -> dict:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}


# -- routes --------------------------------------------------------------------------------
router = APIRouter()


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": list(FILE_PURPOSES)}}}}}}}
_CONTENT = {200: {"description": "the file's bytes", "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


@router.post("/v1/files", openapi_extra=_UPLOAD_BODY, responses=ok(FileObject))
async def upload_file(request: Request):
    fields, files = parse_multipart(request.headers.get("content-type", ""), await request.body())
    if "file" not in files:
        raise RequestError("file: the form has no 'file' part", param="file")
    filename, data = files["file"]
    return ctx_of(request).files.create(filename, fields.get("purpose", ""), data)


@router.get("/v1/files", responses=ok(FileList))
async def list_files(request: Request, purpose: Optional[str] = None):
    return {"object": "list", "data": ctx_of(request).files.list(purpose)}


@router.get("/v1/files/{file_id}", responses=ok(FileObject))
async def retrieve_file(file_id: str, request: Request):
    return ctx_of(request).files.get(file_id)


@router.get("/v1/files/{file_id}/content", response_class=Response, responses=_CONTENT)
async def file_content(file_id: str, request: Request):
    return Response(ctx_of(request).files.content(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", responses=ok(Deleted))
async def delete_file(file_id: str, request: Request):
    return ctx_of(request).files.delete(file_id)


@router.post("/v1/batches", responses=ok(Batch))
async def create_batch(req: BatchCreateRequest, request: Request):
    return ctx_of(request).batches.create(req)


@router.get("/v1/batches", responses=ok(BatchList))
async def list_batches(request: Request, limit: int = 20):
    batches = ctx_of(request).batches.list()[:max(1, limit)]
    return {"object": "list", "data": batches, "first_id": batches[0]["id"] if batches else None,
            "last_id": batches[-1]["id"] if batches else None, "has_more": False}


@router.get("/v1/batches/{batch_id}", responses=ok(Batch))
async def retrieve_batch(batch_id: str, request: Request):
    return ctx_of(request).batches.get(batch_id)


@router.post("/v1/batches/{batch_id}/cancel", responses=ok(Batch))
async def cancel_batch(batch_id: str, request: Request):
    return ctx_of(request).batches.cancel(batch_id)
