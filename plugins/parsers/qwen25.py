"""Qwen2.5 / Hermes 2 Pro tool calls: each call is one JSON object inside its own tags.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {}}
    </tool_call>

Text around the tags is normal text. A missing closing tag is tolerated.
"""
from __future__ import annotations

import json

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.json_tools import JsonCallSyntax, JsonRegionParser
from kvyard_plugins.parsers.scanning import Opener, marker_opener

BEGIN = "<tool_call>"
END = "</tool_call>"


class Qwen25Parser(JsonRegionParser):
    name = "qwen25"
    _syntaxes = {BEGIN: JsonCallSyntax(closer=END)}

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        return marker_opener(text, pos, self._syntaxes, final)

    def structure_info(self, function_name: str) -> StructureInfo:
        return StructureInfo(begin=f'{BEGIN}\n{{"name": {json.dumps(function_name)}, "arguments": ',
                             end=f"}}\n{END}", trigger=BEGIN)


class HermesParser(Qwen25Parser):
    """NousResearch Hermes 2 Pro and later: the same tags as Qwen2.5 (Qwen adopted them)."""
    name = "hermes"
