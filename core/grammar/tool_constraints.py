"""Grammar constraints that force a tool call when the request's tool_choice demands one.

With tool_choice "required", or {"type": "function", "function": {"name": F}}, the sampler is
constrained (through the grammar backend's json_schema mode) to one JSON document of this shape:

    [{"name": "<a tool name>", "parameters": {<arguments valid for that tool's schema>}}, ...]

"required" allows one or more calls of any tools (exactly one when parallel calls are off); a
named function allows exactly one call of F. The shape is the same whatever the model's native
tool-call format, so that output is read back with ``parse_constrained_tool_calls`` (a whole
output) or ``ConstrainedToolCallStream`` (a stream), never with the model's tool-call parser.
"auto", "none" and a missing tool_choice constrain nothing.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from kvyard.parsers import ToolCallItem, ToolSpec, tool_function, tool_names

_DEFS_PREFIXES = ("#/$defs/", "#/definitions/")


def tool_call_constraint(tools: Sequence[ToolSpec] | None, tool_choice: Any,
                         parser_name: str | None = None, parallel: bool = True) -> tuple[str, str] | None:
    """("json_schema", schema JSON text) for a forced tool call, or None when nothing is forced.

    ``parser_name`` (the request's tool-call parser) does not change the shape, see the module
    docstring; it is accepted so callers pass what they have. ``parallel=False`` (OpenAI's
    parallel_tool_calls) limits "required" to one call.
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
        if not parallel:
            schema["maxItems"] = 1
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
    raw = _raw_arguments(text)
    items = []
    for index, call in enumerate(calls):
        if not isinstance(call, dict) or call.get("name") not in names:
            raise ValueError(f"constrained tool call {index} has no known name: {call!r}")
        arguments = call.get("parameters", call.get("arguments", {}))
        if not isinstance(arguments, dict):
            raise ValueError(f"constrained tool call {index}: parameters must be an object")
        text_of = raw.get(index) or json.dumps(arguments, ensure_ascii=False)
        items.append(ToolCallItem(index, call["name"], text_of))
    return items


def _raw_arguments(text: str) -> dict[int, str]:
    """Each call's arguments text exactly as the model wrote it (what the stream sends), so a
    streamed call's deltas concatenate to the non-stream arguments character for character."""
    raw: dict[int, str] = {}
    for item in ConstrainedToolCallStream().feed(text):
        raw[item.tool_index] = raw.get(item.tool_index, "") + item.parameters
    return raw


_ARGUMENT_KEYS = ("parameters", "arguments")   # what parse_constrained_tool_calls reads


class ConstrainedToolCallStream:
    """Reads ``tool_call_constraint`` output chunk by chunk, as OpenAI streams tool calls: a call
    comes out first as (index, name, "") once its name is complete, then as deltas of its
    arguments JSON (name None), the arguments object's text exactly as the model wrote it.

    A scanner over the JSON text: ``_depth`` counts open brackets outside strings (1 = inside
    the array, 2 = inside a call object); strings at depth 2 are keys or the name's value.
    Arguments seen before the name (a grammar that let the keys come in another order) are held
    back until the name arrives. Output that is not the constrained shape yields no calls.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = self._escape = False
        self._text = ""             # the string at depth 2 being read (a key or the name)
        self._key: str | None = None
        self._value_of: str | None = None  # the key whose value comes next, between ":" and ","
        self._in_args = False
        self._args = ""             # arguments text not emitted yet
        self._call = -1             # index of the call being read
        self._name: str | None = None
        self._out: list[ToolCallItem] = []

    def feed(self, text: str) -> list[ToolCallItem]:
        """The items ``text`` (the next chunk of output) completes."""
        for ch in text:
            self._step(ch)
        self._flush_args()
        out, self._out = self._out, []
        return out

    def _step(self, ch: str) -> None:
        if self._in_args:
            self._args += ch
        if self._in_string:
            self._string_char(ch)
        elif ch == '"':
            self._in_string, self._text = True, ""
        elif ch in "[{":
            self._open(ch)
        elif ch in "]}":
            self._close(ch)
        elif self._depth == 2 and not self._in_args and ch in ":,":
            self._value_of = self._key if ch == ":" else None

    def _string_char(self, ch: str) -> None:
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False
            if self._depth == 2 and not self._in_args:
                self._string_done(_json_string(self._text))
            return
        self._text += ch

    def _string_done(self, value: str) -> None:
        if self._value_of is None:
            self._key = value
        elif self._value_of == "name" and self._name is None:
            self._name = value
            self._out.append(ToolCallItem(self._call, value, ""))

    def _open(self, ch: str) -> None:
        if self._depth == 1 and ch == "{":
            self._call += 1
            self._key = self._value_of = self._name = None
            self._args = ""
        elif self._depth == 2 and ch == "{" and self._value_of in _ARGUMENT_KEYS:
            self._in_args, self._args = True, "{"
        self._depth += 1

    def _close(self, ch: str) -> None:
        self._depth -= 1
        if self._in_args and self._depth == 2:
            self._in_args = False
            self._flush_args()

    def _flush_args(self) -> None:
        if self._args and self._name is not None:
            self._out.append(ToolCallItem(self._call, None, self._args))
            self._args = ""


def _json_string(raw: str) -> str:
    """The value of a JSON string's body (between the quotes); the raw text if it is malformed."""
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


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
