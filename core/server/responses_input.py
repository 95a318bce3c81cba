"""Responses API input -> chat messages, tools and tool_choice for the chat pipeline.

``input`` is a string (one user message) or a list of items:
  message               {"role", "content": str | [input_text/output_text parts]} ("type" optional)
  function_call         {"call_id", "name", "arguments"}: joins the assistant turn before it
  function_call_output  {"call_id", "output"}: a tool message; the call_id must name an earlier call
  reasoning             an earlier turn's reasoning item: accepted, not sent to the template
Any other item or part type is a 400 naming the field (``input.3.type``).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from kvyard.errors import RequestError

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _bad(param: str, message: str) -> RequestError:
    return RequestError(f"{param}: {message}", param=param)


def input_messages(items: Any, history: list[dict]) -> list[dict]:
    """Chat messages of ``items``, continuing ``history`` (whose calls outputs may answer)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise _bad("input", "must not be empty")
    known = {c["id"] for m in history for c in m.get("tool_calls") or ()}
    messages: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, f"input.{i}"))
        elif kind == "function_call":
            call = _function_call(item, f"input.{i}")
            known.add(call["id"])
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": ""}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(_call_output(item, f"input.{i}", known))
        elif kind != "reasoning":
            raise _bad(f"input.{i}.type", f"unknown item type {kind!r} (one of {', '.join(ITEM_TYPES)})")
    return messages


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _bad(f"{param}.{key}", "required, a string")
    return value


def _message(item: dict, param: str) -> dict:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise _bad(f"{param}.role", f"must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
    return {"role": "system" if role == "developer" else role, "content": _text(item.get("content"), f"{param}.content")}


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise _bad(f"{param}.{j}.type", f"only text parts are supported ({', '.join(TEXT_PARTS)}), got {kind!r}")
        texts.append(_string(part, "refusal" if kind == "refusal" else "text", f"{param}.{j}"))
    return "".join(texts)


def _function_call(item: dict, param: str) -> dict:
    return {"id": _string(item, "call_id", param), "type": "function",
            "function": {"name": _string(item, "name", param), "arguments": _string(item, "arguments", param)}}


def _call_output(item: dict, param: str, known: set) -> dict:
    call_id = _string(item, "call_id", param)
    if call_id not in known:
        raise _bad(f"{param}.call_id", f"no earlier function_call has call_id {call_id!r}")
    return {"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), f"{param}.output")}


def chat_tools(tools: Optional[Iterable]) -> Optional[list[dict]]:
    """Responses function tools (flat) -> chat tools ({"type", "function": {...}})."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise _bad(f"tools.{i}.type", f"only function tools are supported, got {tool.type!r}")
        if not tool.name:
            raise _bad(f"tools.{i}.name", "required for a function tool")
        function = {"name": tool.name, "parameters": tool.parameters or {"type": "object", "properties": {}}}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def chat_response_format(text: Any) -> Optional[dict]:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise _bad("text.format.schema", "required when type is json_schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "output", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}
