"""Model-agnostic JSON tool calls, for models without a native format.

The whole output (after leading whitespace), or a fenced ```json block inside it, is one call
object or a JSON array of them:

    ```json
    [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    ```

Text around the fenced block is normal text; so is text after a whole-output call.
"""
from __future__ import annotations

import json

from kvyard.parsers import StructureInfo
from kvyard_plugins.parsers.json_tools import JsonCallSyntax, JsonRegionParser
from kvyard_plugins.parsers.scanning import Opener, marker_opener
from kvyard_plugins.parsers.text_scan import skip_ws

FENCE = "```json"
_WHOLE = JsonCallSyntax(list_allowed=True)
_FENCED = JsonCallSyntax(list_allowed=True, closer="```")


class GenericJsonParser(JsonRegionParser):
    name = "json"

    def find_opener(self, text: str, pos: int, at_start: bool, final: bool) -> Opener | None:
        if at_start:
            first = skip_ws(text, pos)
            if first >= len(text):
                return None if final else Opener(pos, None)
            if text[first] in "{[":
                return Opener(pos, first, _WHOLE)
        return marker_opener(text, pos, {FENCE: _FENCED}, final)

    def structure_info(self, function_name: str) -> StructureInfo:
        return StructureInfo(begin=f'{{"name": {json.dumps(function_name)}, "arguments": ',
                             end="}", trigger='{"name":')
