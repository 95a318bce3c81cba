"""What the policies route on: the text of a request body (OpenAI or native), and whether it streams.

Chat messages are joined in order (text parts of multi-part contents included), so requests that
share a system prompt and history share a prefix here as they do in the workers' token caches."""
from __future__ import annotations

import json
from typing import Any


def routing_info(body: bytes) -> tuple[str, bool]:
    """-> (routing text, stream requested). Bodies that are not JSON objects route on ''."""
    try:
        obj = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        return "", False
    if not isinstance(obj, dict):
        return "", False
    return _text_of(obj), bool(obj.get("stream"))


def _text_of(obj: dict) -> str:
    if isinstance(obj.get("messages"), list):
        return "".join(_content_text(m.get("content")) for m in obj["messages"] if isinstance(m, dict))
    for key in ("prompt", "text", "input", "query", "input_ids"):
        if key in obj:
            return _flatten(obj[key])
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _flatten(value: Any) -> str:
    """A batch routes on its first element; token ids on their decimal spelling."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        return _flatten(value[0]) if isinstance(value[0], (list, str)) else " ".join(map(str, value))
    return ""
