"""Recent responses kept in memory, so `previous_response_id` continues a conversation.

Bounded two ways: by count and by the characters of the conversations held (each entry
holds its whole conversation: the items before it, its input and its output). The least
recently used entries go first. One store per replica: a replica that did not serve a
response does not know its id (docs: README, /v1/responses).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_ENTRIES_ENV = "FLASHSERVE_RESPONSES_STORE_MAX_ENTRIES"
MAX_CHARS_ENV = "FLASHSERVE_RESPONSES_STORE_MAX_CHARS"
DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_CHARS = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    """A response's whole conversation as items: what a follow-up request continues."""

    response_id: str
    items: tuple[dict[str, Any], ...]
    chars: int


class ResponseStore:
    def __init__(self, max_entries: int | None = None, max_chars: int | None = None) -> None:
        self.max_entries = max_entries or int(
            os.environ.get(MAX_ENTRIES_ENV) or DEFAULT_MAX_ENTRIES
        )
        self.max_chars = max_chars or int(os.environ.get(MAX_CHARS_ENV) or DEFAULT_MAX_CHARS)
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._chars = 0
        # Requests are prepared on worker threads and finished on the event loop.
        self._lock = threading.Lock()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
            return entry

    def put(self, response_id: str, items: list[dict[str, Any]]) -> bool:
        """Keep a conversation; False when it alone exceeds the character budget."""
        chars = len(json.dumps(items, ensure_ascii=False, separators=(",", ":")))
        if chars > self.max_chars:
            return False
        entry = StoredResponse(response_id, tuple(items), chars)
        with self._lock:
            old = self._entries.pop(response_id, None)
            if old is not None:
                self._chars -= old.chars
            self._entries[response_id] = entry
            self._chars += chars
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                _, evicted = self._entries.popitem(last=False)
                self._chars -= evicted.chars
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._entries
