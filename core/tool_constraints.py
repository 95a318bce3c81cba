"""Grammar constraints that force a tool call when the request's tool_choice demands one.

With tool_choice "required", or {"type": "function", "function": {"name": F}}, the sampler is
constrained (through the grammar backend's json_schema mode) to one JSON document of this shape:

    [{"name": "<a tool name>", "parameters": {<arguments valid for that tool's schema>}}, ...]

"required" allows one or more calls of any tools; a named function allows exactly one call of F.
The shape is the same whatever the model's native tool-call format, so that output is read back
with ``parse_constrained_tool_calls``, never with the model's tool-call parser.
"auto", "none" and a missing tool_choice constrain nothing.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from kvyard.parsers import ToolCallItem, ToolSpec, tool_function, tool_names

_DEFS_PREFIXES = ("#/$defs/", "#/definitions/")


def tool_call_constraint(tools: Sequence[ToolSpec] | None, tool_choice: Any,
                         parser_name: str | None = None) -> tuple[str, str] | None:
    """("json_schema", schema JSON text) for a forced tool call, or None when nothing is forced.

    ``parser_name`` (the request's tool-call parser) does not change the shape, see the module
    docstring; it is accepted so callers pass what they have.
    """
    choice = _choice(tool_choice)
    if choice in (None, "auto", "none"):
        return None
    functions = [tool_function(t) for t in tools or ()]
    if not functions:
        raise ValueError(f"tool_choice {choice!r} needs a non-empty tools list")
    defs: dict[str, Any] = {}
    if choice == "required":
        items = {"anyOf": [_call_schema(f, i, defs) for i, f in enumerate(functions)]}
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    else:
        index = _named_index(functions, choice)
        schema = {"type": "array", "minItems": 1, "maxItems": 1,
                  "items": _call_schema(functions[index], index, defs)}
    if defs:
        schema["$defs"] = defs
    return "json_schema", json.dumps(schema, ensure_ascii=False)


def parse_constrained_tool_calls(text: str, tools: Sequence[ToolSpec] | None) -> list[ToolCallItem]:
    """Calls from output produced under ``tool_call_constraint``; ValueError if it is not that
    shape (e.g. cut short by max_tokens) or names a function outside ``tools``."""
    try:
        calls = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"constrained tool-call output is not JSON: {exc}") from exc
    if not isinstance(calls, list) or not calls:
        raise ValueError("constrained tool-call output must be a non-empty JSON array")
    names = set(tool_names(tools))
    items = []
    for index, call in enumerate(calls):
        if not isinstance(call, dict) or call.get("name") not in names:
            raise ValueError(f"constrained tool call {index} has no known name: {call!r}")
        arguments = call.get("parameters", call.get("arguments", {}))
        if not isinstance(arguments, dict):
            raise ValueError(f"constrained tool call {index}: parameters must be an object")
        items.append(ToolCallItem(index, call["name"], json.dumps(arguments, ensure_ascii=False)))
    return items


def _choice(tool_choice: Any) -> str | None:
    """"auto" / "none" / "required" / a function name, from the OpenAI tool_choice forms."""
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "auto", "none", "required"):
            raise ValueError(f"tool_choice must be auto, none, required or a function, got {tool_choice!r}")
        return tool_choice
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump()
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"tool_choice: expected {{'type': 'function', 'function': {{'name': ...}}}}, "
                         f"got {tool_choice!r}")
    return name


def _named_index(functions: list[dict], name: str) -> int:
    for index, function in enumerate(functions):
        if function["name"] == name:
            return index
    raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                     f"({', '.join(f['name'] for f in functions)})")


def _call_schema(function: dict, index: int, defs: dict[str, Any]) -> dict[str, Any]:
    """Schema of one call object; the tool's own $defs move to the root under a unique prefix."""
    parameters = _hoist_defs(function.get("parameters") or {"type": "object"}, f"tool{index}_", defs)
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [function["name"]]},
                       "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


def _hoist_defs(schema: Any, prefix: str, defs: dict[str, Any]) -> Any:
    """Moves "$defs"/"definitions" to ``defs`` (renamed with ``prefix``) and rewrites the $refs,
    because the schema is nested under the call schema and its refs would point at the new root."""
    if isinstance(schema, list):
        return [_hoist_defs(s, prefix, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                defs[prefix + name] = _hoist_defs(sub, prefix, defs)
        elif key == "$ref" and isinstance(value, str):
            out[key] = _rewrite_ref(value, prefix)
        else:
            out[key] = _hoist_defs(value, prefix, defs)
    return out


def _rewrite_ref(ref: str, prefix: str) -> str:
    for old in _DEFS_PREFIXES:
        if ref.startswith(old):
            return "#/$defs/" + prefix + ref[len(old):]
    return ref
