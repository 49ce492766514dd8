"""What the structured-output tests ask for, and how each kind of output is checked.

JSON schemas (SCHEMAS, sent strict unless listed in NOT_STRICT), EBNF grammars with the
regex their outputs must match (GRAMMARS), and a structural tag (STRUCTURAL_TAG). A
request id names what was asked for ("schema:<name>:<n>", "object:<n>",
"grammar:<name>:<n>", "tag:<n>"); `check_output` checks a text against it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9},
        "y": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["x", "y"],
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 6},
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["name", "id"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L", 1, None]},
        },
        "required": ["color", "size"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -5, "maximum": 5},
            "b": {"type": "string", "maxLength": 4},
            "c": {"type": "boolean"},
        },
        "required": ["a"],
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": -10, "maximum": 10},
            "y": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        },
        "required": ["x", "y"],
    },
    "patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        },
        "required": ["code", "zip"],
    },
    "formats": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "day": {"type": "string", "format": "date"},
        },
        "required": ["id", "day"],
    },
    "defs_ref": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "v": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 5},
                    {"type": "null"},
                    {"enum": ["x", "y"]},
                ]
            }
        },
        "required": ["v"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["a", "b"]}, "on": {"type": "boolean"}},
            "required": ["k", "on"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "const_matrix": {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 1},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            },
        },
        "required": ["version", "matrix"],
    },
    "recursive_ref": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "next": {"$ref": "#/$defs/node"},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "dice": {"type": "integer", "minimum": 1, "maximum": 6},
    "closed_object": {
        "title": "Flag",
        "type": "object",
        "properties": {"ok": {"type": "boolean", "description": "whether it worked"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
}
NOT_STRICT = {"closed_object"}  # schemas sent without strict: true

# Formats xgrammar enforces exactly; its "date" is lexical (it accepts 2024-02-30), which
# jsonschema's calendar check would reject, so dates are checked by their shape below.
FORMATS = jsonschema.FormatChecker(formats=["uuid", "ipv6", "email"])
DATE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")

SQL_GRAMMAR = r"""
root ::= "SELECT " cols " FROM " table where? ";"
cols ::= col (", " col){0,2}
col ::= "id" | "name" | "age"
table ::= "users" | "orders"
where ::= " WHERE " col " = " [0-9] [0-9]? [0-9]?
"""
SQL = re.compile(
    r"^SELECT (id|name|age)(, (id|name|age)){0,2} FROM (users|orders)"
    r"( WHERE (id|name|age) = [0-9]{1,3})?;$"
)

ARITHMETIC_GRAMMAR = r"""
root ::= term ((" + " | " - ") term){0,3}
term ::= num | "(" num ((" + " | " * ") num){0,2} ")"
num ::= [1-9] [0-9]?
"""
_NUM = r"[1-9][0-9]?"
_TERM = rf"({_NUM}|\({_NUM}(( \+ | \* ){_NUM}){{0,2}}\))"
ARITHMETIC = re.compile(rf"^{_TERM}(( \+ | - ){_TERM}){{0,3}}$")

QUERY_GRAMMAR = r"""
root ::= pair ("&" pair){0,3}
pair ::= key "=" value
key ::= [a-z] [a-z0-9_]{0,5}
value ::= "true" | "false" | [A-Za-z0-9]{1,6}
"""
QUERY = re.compile(
    r"^[a-z][a-z0-9_]{0,5}=[A-Za-z0-9]{1,6}(&[a-z][a-z0-9_]{0,5}=[A-Za-z0-9]{1,6}){0,3}$"
)

GRAMMARS = {
    "sql": (SQL_GRAMMAR, SQL),
    "arithmetic": (ARITHMETIC_GRAMMAR, ARITHMETIC),
    "query": (QUERY_GRAMMAR, QUERY),
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "celsius": {"type": "integer", "minimum": -40, "maximum": 50},
    },
    "required": ["city", "celsius"],
}
STRUCTURAL_TAG = {
    "type": "structural_tag",
    "format": {
        "type": "sequence",
        "elements": [
            {"type": "const_string", "value": "Result: "},
            {
                "type": "or",
                "elements": [
                    {
                        "type": "tag",
                        "begin": "<weather>",
                        "content": {
                            "type": "json_schema",
                            "json_schema": WEATHER,
                            "max_whitespace_cnt": 1,
                        },
                        "end": "</weather>",
                    },
                    {
                        "type": "tag",
                        "begin": "<time>",
                        "content": {"type": "regex", "pattern": "[0-2][0-9]:[0-5][0-9]"},
                        "end": "</time>",
                    },
                ],
            },
        ],
    },
}
# DOTALL: JSON inside the tag may hold whitespace (max_whitespace_cnt), newlines included.
TAG_OUTPUT = re.compile(
    r"^Result: (<weather>(.*)</weather>|<time>[0-2][0-9]:[0-5][0-9]</time>)$", re.DOTALL
)


def check_tag_output(text: str) -> None:
    match = TAG_OUTPUT.match(text)
    assert match, text
    if match.group(2) is not None:
        jsonschema.validate(json.loads(match.group(2)), WEATHER)


def schema_format(name: str) -> dict[str, Any]:
    json_schema: dict[str, Any] = {"name": name, "schema": SCHEMAS[name]}
    if name not in NOT_STRICT:
        json_schema["strict"] = True
    return {"type": "json_schema", "json_schema": json_schema}


def check_output(rid: str, text: str) -> None:
    kind, _, rest = rid.partition(":")
    name = rest.rpartition(":")[0]
    if kind == "schema":
        value = json.loads(text)
        jsonschema.validate(value, SCHEMAS[name], format_checker=FORMATS)
        if name == "formats":
            assert DATE.match(value["day"]), text
    elif kind == "object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "grammar":
        assert GRAMMARS[name][1].match(text), text
    elif kind == "tag":
        check_tag_output(text)
    else:
        raise AssertionError(rid)
