"""Naming request fields and values in error messages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flashserve.api.http.errors import RequestError

INVALID_REQUEST = "invalid_request"
# Client-chosen keys are clipped to this in `param` and messages.
MAX_KEY_IN_PATH = 64


def invalid_field(message: str, param: str | None) -> RequestError:
    return RequestError(message, param=param, code=INVALID_REQUEST)


def format_path(parts: Iterable[str | int]) -> str | None:
    """`("messages", 0, "role")` -> `"messages[0].role"`; None for the body itself."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # Keys are client-chosen: clip them so an error cannot echo megabytes back.
            key = part if len(part) <= MAX_KEY_IN_PATH else part[: MAX_KEY_IN_PATH - 3] + "..."
            out += f".{key}" if out else key
    return out or None


def short_value(value: Any, limit: int = 60) -> str:
    """A JSON rendering of `value` fit for a message; hostile bodies carry huge values."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
