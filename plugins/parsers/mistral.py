"""Mistral tool calls: a marker, then a JSON array of call objects.

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]

A single object without the array brackets is accepted too. Text before the marker is normal
text, and so is text after the array.
"""
from __future__ import annotations

import json

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.json_tools import JsonCallSyntax, JsonRegionParser
from kvyard_plugins.parsers.scanning import Opener, marker_opener

BEGIN = "[TOOL_CALLS]"


class MistralParser(JsonRegionParser):
    name = "mistral"
    _syntaxes = {BEGIN: JsonCallSyntax(list_allowed=True)}

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        return marker_opener(text, pos, self._syntaxes, final)

    def structure_info(self, function_name: str) -> StructureInfo:
        return StructureInfo(begin=f'{BEGIN} [{{"name": {json.dumps(function_name)}, "arguments": ',
                             end="}]", trigger=BEGIN)
