"""Raw HTTP body bytes -> a JSON value, refusing hostile bytes with a 400.

The Truss server's own parser answers invalid UTF-8 and deeply nested JSON
with a 500 (UnicodeDecodeError and RecursionError escape it), and its 400s are
not OpenAI-shaped. model.py therefore takes the raw request and the body is
parsed here: every way a body can be malformed is a RequestError (400).

Checks, cheapest first: size, strict UTF-8, JSON syntax (nesting that
exhausts the decoder's recursion guard included), NaN/Infinity, and lone
UTF-16 surrogates written as `\\ud800` escapes (valid JSON, but no UTF-8 text
can hold them, so the tokenizer and the JSON encoder of the response would
fail on them later).
"""

from __future__ import annotations

import json
import re
from typing import Any

from flashserve.api.http.errors import RequestError

INVALID_BODY = "invalid_body"
# Only bodies holding a surrogate escape at all need the full walk below;
# clients that escape non-ASCII (Python's json.dumps does) send valid pairs.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(message, param=param, code=INVALID_BODY)


def _reject_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, max_bytes: int) -> Any:
    """Decode and parse a request body; raise RequestError (400) for anything malformed."""
    if len(raw) > max_bytes:
        raise _invalid(f"The request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(
            f"The request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
        ) from exc
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _invalid(
            f"The request body is not valid JSON: {exc.msg} at character {exc.pos}"
        ) from exc
    except ValueError as exc:  # NaN / Infinity
        raise _invalid(f"The request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _invalid("The request body is nested too deeply") from exc
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(body)
    return body


def _check_surrogates(body: Any) -> None:
    """Refuse strings (keys included) that hold unpaired surrogates; iterative, no recursion."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            _check_text(node, path)
        elif isinstance(node, dict):
            for key, value in node.items():
                _check_text(key, path)
                stack.append((value, f"{path}.{key[:64]}" if path else key[:64]))
        elif isinstance(node, list):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = f"'{path}'" if path else "The request body"
        raise _invalid(
            f"{where} holds an unpaired UTF-16 surrogate (\\u{ord(text[exc.start]):04x}), "
            "which is not valid Unicode text",
            path or None,
        ) from exc
