"""JSON Schema -> compact-JSON EBNF, for grammars that embed JSON in a structural tag
(forced tool calls, a response_format after a thinking block)."""

from __future__ import annotations

import functools
import json
from typing import Any

from flashserve.api.frontend.structured.subschemas import child_schemas
from flashserve.engine.structured import InvalidGrammarError, clean_xgrammar_message

# Keys of a string schema that already pin its characters; a length bound alongside
# them is left as it is.
_STRING_SHAPERS = ("pattern", "format", "enum", "const")
# JSON string characters without escapes: anything but '"', '\' and control characters.
_PLAIN_CHAR = r'[^"\\\x00-\x1f]'


def bound_strings(schema: Any) -> None:
    """Give length-bounded strings a pattern of characters needing no escape, in place.

    xgrammar 0.2.8 lets a string with minLength/maxLength hold raw control characters,
    which no JSON parser accepts; the pattern is a subset of what the schema allows, so
    everything it produces still validates.
    """
    if not isinstance(schema, dict):
        return
    bounded = "minLength" in schema or "maxLength" in schema
    if schema.get("type") == "string" and bounded and not any(k in schema for k in _STRING_SHAPERS):
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        schema["pattern"] = f"^{_PLAIN_CHAR}{{{low},{'' if high is None else int(high)}}}$"
        schema.pop("minLength", None)
        schema.pop("maxLength", None)
    for _, sub in child_schemas(schema):
        bound_strings(sub)


@functools.lru_cache(maxsize=256)
def json_ebnf(schema_json: str, strict: bool) -> str:
    """EBNF for compact JSON (no free whitespace: a weak model could otherwise write
    spaces until max_tokens) that validates against the schema in `schema_json`."""
    import xgrammar as xgr

    schema = json.loads(schema_json)
    bound_strings(schema)
    try:
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    except (RuntimeError, ValueError) as exc:
        raise InvalidGrammarError(clean_xgrammar_message(str(exc))) from exc
    return str(grammar)
