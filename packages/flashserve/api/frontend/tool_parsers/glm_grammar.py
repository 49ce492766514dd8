"""The structural-tag format of GLM-4.5 arguments (`<arg_key>`/`<arg_value>` pairs) for a
tool's parameters schema, for forced calls (api/tool_grammar.py).

The pairs come in the schema's declared property order, required ones always and the
others optionally, and no key beyond the schema's (as the JSON formats are strict). A key
that takes text (glm.takes_text) gets text its schema allows: one of its string `enum`
values or `const`, its `pattern`, its length bounds, else any text without "<" (so that
"</arg_value>" cannot occur inside); any other key gets the compact JSON of its schema,
which the parser reads back as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flashserve.api.frontend.tool_parsers.base import const, one_of, sequence

KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"

# JsonFormat(schema, arguments=False): the format of a JSON value of any schema.
JsonFormat = Callable[..., dict[str, Any]]


def pairs_format(parameters: dict[str, Any], json_format: JsonFormat) -> dict[str, Any]:
    from flashserve.api.frontend.tool_parsers.glm import resolve, takes_text

    schema = parameters or {}
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    pairs: list[dict[str, Any]] = []
    for key, sub in properties.items():
        sub = resolve(sub, schema)
        if takes_text(sub, schema):
            value = text_format(sub if isinstance(sub, dict) else {})
        else:
            value = json_format(_with_definitions(sub, schema), arguments=False)
        pair = sequence(
            const(f"{KEY_OPEN}{key}{KEY_CLOSE}\n{VALUE_OPEN}"), value, const(f"{VALUE_CLOSE}\n")
        )
        pairs.append(pair if key in required else {"type": "optional", "content": pair})
    if not pairs:
        return const("")
    return pairs[0] if len(pairs) == 1 else sequence(*pairs)


def text_format(schema: dict[str, Any]) -> dict[str, Any]:
    """A value kept as text: what of the schema's string constraints a regex can say."""
    if isinstance(schema.get("const"), str):
        return const(schema["const"])
    if isinstance(schema.get("enum"), list):
        texts = [v for v in schema["enum"] if isinstance(v, str)]
        if texts:
            return one_of([const(text) for text in texts])
    if isinstance(schema.get("pattern"), str):
        pattern = schema["pattern"].removeprefix("^")
        if pattern.endswith("$") and not pattern.endswith("\\$"):
            pattern = pattern[:-1]
        return {"type": "regex", "pattern": pattern}
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    return {"type": "regex", "pattern": f"[^<]{{{low},{'' if high is None else int(high)}}}"}


def _with_definitions(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """A property's schema with the root's definitions, so its "$ref"s still resolve."""
    out = dict(schema) if isinstance(schema, dict) else {}
    for key in ("$defs", "definitions"):
        if key in root and key not in out:
            out[key] = json.loads(json.dumps(root[key]))
    return out
