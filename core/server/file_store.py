"""The /v1/files store: one data file and one JSON metadata file per upload, under
``<--file-storage-path>/files``. Survives restarts; ids are ``file-<hex>``."""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from typing import Optional

from kvyard.errors import RequestError

FILE_PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "user_data", "evals")
_ID = re.compile(r"^file-[0-9a-f]{32}$")


class FileStore:
    def __init__(self, root: str):
        self.dir = os.path.join(root, "files")
        os.makedirs(self.dir, exist_ok=True)

    def _paths(self, file_id: str) -> tuple[str, str]:
        if not _ID.match(file_id):
            raise RequestError(f"file_id: no file {file_id!r}", param="file_id", status=404)
        base = os.path.join(self.dir, file_id)
        return base + ".json", base + ".data"

    def create(self, filename: str, purpose: str, data: bytes) -> dict:
        if purpose not in FILE_PURPOSES:
            raise RequestError(f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}", param="purpose")
        file_id = f"file-{uuid.uuid4().hex}"
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        meta_path, data_path = self._paths(file_id)
        _write_atomic(data_path, data)
        _write_atomic(meta_path, json.dumps(meta).encode())
        return meta

    def get(self, file_id: str) -> dict:
        meta_path, _ = self._paths(file_id)
        if not os.path.exists(meta_path):
            raise RequestError(f"file_id: no file {file_id!r}", param="file_id", status=404)
        with open(meta_path) as fh:
            return json.load(fh)

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        with open(self._paths(file_id)[1], "rb") as fh:
            return fh.read()

    def delete(self, file_id: str) -> dict:
        self.get(file_id)
        for path in self._paths(file_id):
            os.remove(path)
        return {"id": file_id, "object": "file", "deleted": True}

    def list(self, purpose: Optional[str] = None) -> list[dict]:
        ids = sorted(name[:-5] for name in os.listdir(self.dir) if name.endswith(".json"))
        files = [self.get(i) for i in ids if _ID.match(i)]
        files = [f for f in files if purpose is None or f["purpose"] == purpose]
        return sorted(files, key=lambda f: f["created_at"], reverse=True)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """(form fields, files as name -> (filename, bytes)) of a multipart/form-data body.
    The standard library's MIME parser does the work; no extra dependency."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError("file: send multipart/form-data with a 'file' part and a 'purpose' field", param="file")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError("file: the multipart body could not be parsed", param="file")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, data)
        elif name is not None:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{name}: must be UTF-8 text", param=name) from None
    return fields, files
