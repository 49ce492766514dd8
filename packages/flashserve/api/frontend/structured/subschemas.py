"""Where a JSON Schema holds subschemas: the one table both schema walkers use."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Maps of subschemas, lists of them, and single ones (`items` may also be a draft-07
# list of tuple items).
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("prefixItems", "allOf", "anyOf", "oneOf")
SUBSCHEMA_VALUES = (
    "items",
    "additionalItems",
    "additionalProperties",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contains",
    "not",
    "if",
    "then",
    "else",
)


def child_schemas(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(path from `schema` as "key/name" or "key/index" or "key", subschema) for each
    direct subschema; values of the wrong shape are yielded as they are."""
    for key in SUBSCHEMA_MAPS:
        subs = schema.get(key)
        if isinstance(subs, dict):
            for name, sub in subs.items():
                yield f"{key}/{name}", sub
    for key in SUBSCHEMA_LISTS:
        subs = schema.get(key)
        if isinstance(subs, list):
            for i, sub in enumerate(subs):
                yield f"{key}/{i}", sub
    for key in SUBSCHEMA_VALUES:
        sub = schema.get(key)
        if isinstance(sub, list):
            for i, item in enumerate(sub):
                yield f"{key}/{i}", item
        elif key in schema:
            yield key, sub
