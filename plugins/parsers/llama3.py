"""Llama 3.1 / 3.2 JSON tool calls.

The output is one or more call objects separated by ";", either as the whole message (it starts
with "{") or after the ``<|python_tag|>`` marker:

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

"parameters" and "arguments" are both accepted. Text before the marker is normal text.
"""
from __future__ import annotations

import json

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.json_tools import JsonCallSyntax, JsonRegionParser
from kvyard_plugins.parsers.scanning import Opener, marker_opener
from kvyard_plugins.parsers.text_scan import skip_ws

PYTHON_TAG = "<|python_tag|>"
_SYNTAX = JsonCallSyntax(separator=";")


class Llama3Parser(JsonRegionParser):
    name = "llama3"

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        if at_start:
            first = skip_ws(text, pos)
            if first >= len(text):
                return None if final else Opener(pos, None)
            if text[first] == "{":
                return Opener(pos, first, _SYNTAX)
        return marker_opener(text, pos, {PYTHON_TAG: _SYNTAX}, final)

    def structure_info(self, function_name: str) -> StructureInfo:
        return StructureInfo(begin=f'{PYTHON_TAG}{{"name": {json.dumps(function_name)}, "parameters": ',
                             end="}", trigger=PYTHON_TAG)
