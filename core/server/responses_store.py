"""Stored responses of the Responses API (``store: true``): in memory, bounded.

Each entry is the response object as returned plus the conversation it ends (chat messages:
the earlier turns, this input and this output), which a later ``previous_response_id`` continues.
The store keeps the newest ``capacity`` responses (least recently used go first); it lives and
dies with the server process: a restart forgets them, as the API's 30-day retention allows.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

DEFAULT_CAPACITY = 1024


@dataclass(frozen=True)
class StoredResponse:
    response: dict          # the Response object
    messages: list[dict]    # the whole conversation as chat messages (without instructions)


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, entry: StoredResponse) -> None:
        with self._lock:
            self._items[entry.response["id"]] = entry
            self._items.move_to_end(entry.response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Optional[StoredResponse]:
        with self._lock:
            entry = self._items.get(response_id)
            if entry is not None:
                self._items.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)
