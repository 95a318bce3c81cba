"""Anthropic Messages -> chat messages, tools and tool_choice for the chat pipeline.

User turns: text blocks become the user message; each tool_result block becomes a tool message
(before the user's text) and must answer a tool_use of an earlier assistant turn. Assistant turns:
text blocks are the content, tool_use blocks the tool calls (input -> arguments JSON), thinking
blocks the reasoning_content. Images, documents and server tools are a 400 naming the field.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from kvyard.errors import RequestError


def _bad(param: str, message: str) -> RequestError:
    return RequestError(f"{param}: {message}", param=param)


def system_text(system: Any) -> Optional[str]:
    if system is None or isinstance(system, str):
        return system or None
    return _text_blocks(system, "system")


def _text_blocks(blocks: list, param: str) -> str:
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise _bad(f"{param}.{j}.type", f"only text blocks are supported here, got {kind!r}")
        texts.append(block["text"])
    return "".join(texts)


def chat_messages(messages: list) -> list[dict]:
    out: list[dict] = []
    known: set[str] = set()
    for i, m in enumerate(messages):
        param = f"messages.{i}.content"
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        if m.role == "assistant":
            out.append(_assistant(blocks, param, known))
        else:
            out += _user(blocks, param, known)
    return out


def _assistant(blocks: list, param: str, known: set) -> dict:
    message: dict = {"role": "assistant", "content": ""}
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            message["content"] += _field(block, "text", str, f"{param}.{j}")
        elif kind == "tool_use":
            call_id = _field(block, "id", str, f"{param}.{j}")
            known.add(call_id)
            arguments = json.dumps(_field(block, "input", dict, f"{param}.{j}"), ensure_ascii=False)
            message.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function",
                 "function": {"name": _field(block, "name", str, f"{param}.{j}"), "arguments": arguments}})
        elif kind == "thinking":
            message["reasoning_content"] = message.get("reasoning_content", "") + \
                _field(block, "thinking", str, f"{param}.{j}")
        elif kind != "redacted_thinking":
            raise _bad(f"{param}.{j}.type", f"unsupported block type {kind!r} in an assistant turn "
                       "(text, tool_use, thinking)")
    return message


def _user(blocks: list, param: str, known: set) -> list[dict]:
    tools, texts = [], []
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(_field(block, "text", str, f"{param}.{j}"))
        elif kind == "tool_result":
            call_id = _field(block, "tool_use_id", str, f"{param}.{j}")
            if call_id not in known:
                raise _bad(f"{param}.{j}.tool_use_id", f"no earlier tool_use block has id {call_id!r}")
            tools.append({"role": "tool", "tool_call_id": call_id, "content": _result_text(block, f"{param}.{j}")})
        else:
            raise _bad(f"{param}.{j}.type", f"unsupported block type {kind!r} in a user turn (text, tool_result)")
    return tools + ([{"role": "user", "content": "".join(texts)}] if texts or not tools else [])


def _result_text(block: dict, param: str) -> str:
    content = block.get("content", "")
    text = content if isinstance(content, str) else _text_blocks(content, f"{param}.content")
    return f"Error: {text}" if block.get("is_error") else text


def _field(block: dict, key: str, kind: type, param: str):
    value = block.get(key)
    if not isinstance(value, kind):
        raise _bad(f"{param}.{key}", f"required, {'an object' if kind is dict else 'a string'}")
    return value


def chat_tools(tools: Optional[list]) -> Optional[list[dict]]:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (None, "custom"):
            raise _bad(f"tools.{i}.type", f"only custom (client) tools are supported, got {tool.type!r}")
        function = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any, has_tools: bool) -> Any:
    """auto / any / tool / none -> the chat tool_choice."""
    if choice is None:
        return None
    if choice.type != "none" and not has_tools:
        raise _bad("tool_choice", f"{choice.type!r} needs tools")
    if choice.type == "tool":
        if not choice.name:
            raise _bad("tool_choice.name", "required when type is 'tool'")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def thinking_budget(thinking: Any, max_tokens: Optional[int]) -> Optional[int]:
    """thinking.budget_tokens when enabled (Anthropic: at least 1024, below max_tokens)."""
    if thinking is None or thinking.type == "disabled":
        return None
    if thinking.type == "adaptive":
        return None
    budget = thinking.budget_tokens
    if budget is None:
        raise _bad("thinking.budget_tokens", "required when thinking is enabled")
    if budget < 1:
        raise _bad("thinking.budget_tokens", f"must be >= 1, got {budget}")
    if max_tokens is not None and budget >= max_tokens:
        raise _bad("thinking.budget_tokens", f"must be less than max_tokens ({max_tokens}), got {budget}")
    return budget
