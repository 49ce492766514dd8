"""Build data/ChatCompletionRequest.schema.json from Baseten's published request schema.

The published schema `$ref`s ten definitions under `#/components/schemas/` that it
does not contain, so on its own it cannot validate a request completely. This script
copies it, points every `$ref` at `#/$defs/<Name>` and writes those ten definitions
(as specified in shared/api/REFERENCE.md) into `$defs`. Everything else is kept as
published. Re-run it whenever the published schema changes:

    python scripts/build_request_schema.py [path/to/ChatCompletionRequest.schema.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

DEFAULT_SOURCE = Path("/work/shared/api/ChatCompletionRequest.schema.json")
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "data" / "ChatCompletionRequest.schema.json"

PUBLISHED_REF_PREFIX = "#/components/schemas/"
LOCAL_REF_PREFIX = "#/$defs/"

# Draft 2020-12 forbids a non-empty fragment in `$id`, and the published
# "#/components/schemas/ChatCompletionRequest" makes the schema itself invalid
# (check_schema rejects it). An absolute URN keeps the schema identifiable and
# lets the local `#/$defs/...` refs resolve against it.
SCHEMA_ID = "urn:flashserve:ChatCompletionRequest"

STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
INTEGER = {"type": "integer"}
INT_ARRAY = {"type": "array", "items": INTEGER}


def _closed(
    properties: dict[str, Any], required: list[str], title: str | None = None
) -> dict[str, Any]:
    """An object schema that rejects keys it does not list (all definitions but messages)."""
    schema: dict[str, Any] = {"title": title} if title else {}
    schema.update(type="object", additionalProperties=False, properties=properties)
    if required:
        schema["required"] = required
    return schema


def _tagged(title: str, tag: str, **fields: Any) -> dict[str, Any]:
    """A response format: `{"type": <tag>, ...}` with every listed field required."""
    return _closed({"type": {"const": tag}, **fields}, ["type", *fields], title)


def _open(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    """An object schema that allows keys it does not list (the message subtree)."""
    return {"type": "object", "properties": properties, "required": list(required)}


def _part(tag: str, **fields: Any) -> dict[str, Any]:
    """A content part: `{"type": <tag>, ...}` with every listed field required."""
    return _open({"type": {"const": tag}, **fields}, "type", *fields)


# The message subtree stays open (no additionalProperties) as REFERENCE.md asks:
# clients round-trip extra keys such as `refusal` or `cache_control`.
_CONTENT_PART = {
    "title": "ChatCompletionContentPart",
    "anyOf": [
        _part("text", text=STRING),
        _part("image_url", image_url=_open({"url": STRING, "detail": STRING}, "url")),
        _part(
            "input_audio", input_audio=_open({"data": STRING, "format": STRING}, "data", "format")
        ),
    ],
}

_TOOL_CALL = _open(
    {
        "id": STRING,
        "type": {"const": "function"},
        "function": _open({"name": STRING, "arguments": STRING}, "name", "arguments"),
        "index": INTEGER,
    },
    "id",
    "type",
    "function",
)

DEFINITIONS: dict[str, dict[str, Any]] = {
    "ChatCompletionMessage": {
        "title": "ChatCompletionMessage",
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
            # null is accepted beyond REFERENCE.md: OpenAI clients send
            # `"content": null` on assistant messages that only carry tool_calls.
            "content": {
                "anyOf": [
                    STRING,
                    {"type": "array", "items": _CONTENT_PART},
                    {"type": "null"},
                ]
            },
            "name": STRING,
            "tool_calls": {"type": "array", "items": _TOOL_CALL},
            "tool_call_id": STRING,
        },
        "required": ["role"],
    },
    "StreamOptions": _closed(
        {
            "include_usage": {**BOOLEAN, "default": True},
            "continuous_usage_stats": {**BOOLEAN, "default": True},
        },
        [],
        "StreamOptions",
    ),
    "ResponseFormatText": _tagged("ResponseFormatText", "text"),
    "ResponseFormatJsonObject": _tagged("ResponseFormatJsonObject", "json_object"),
    "ResponseFormatJson": _tagged(
        "ResponseFormatJson",
        "json_schema",
        json_schema=_closed(
            {
                "name": STRING,
                "description": STRING,
                "schema": {"type": "object"},
                "strict": {"const": True},
            },
            ["name", "schema"],
        ),
    ),
    "ResponseFormatGrammar": _tagged("ResponseFormatGrammar", "grammar", grammar=STRING),
    "ResponseFormatStructuralTag": _tagged(
        "ResponseFormatStructuralTag", "structural_tag", structural_tag=STRING
    ),
    "ChatCompletionToolsParam": _closed(
        {
            "type": {"const": "function", "default": "function"},
            "function": {"$ref": LOCAL_REF_PREFIX + "FunctionDefinition"},
        },
        ["function"],
        "ChatCompletionToolsParam",
    ),
    "FunctionDefinition": _closed(
        {
            "name": STRING,
            "description": STRING,
            "parameters": {"type": "object"},
            "strict": {**BOOLEAN, "default": False},
        },
        ["name"],
        "FunctionDefinition",
    ),
    "ChatCompletionNamedToolChoiceParam": _closed(
        {
            "type": {"const": "function", "default": "function"},
            "function": _closed({"name": STRING}, ["name"]),
        },
        ["function"],
        "ChatCompletionNamedToolChoiceParam",
    ),
    "DisaggregatedParams": _closed(
        {
            "request_type": STRING,
            "first_gen_tokens": INT_ARRAY,
            "ctx_request_id": INTEGER,
            "opaque_state": STRING,
            "draft_tokens": INT_ARRAY,
            "multimodal_embedding_handles": {"type": "array", "items": {"type": "object"}},
            "multimodal_hashes": {"type": "array", "items": INT_ARRAY},
        },
        ["request_type"],
        "DisaggregatedParams",
    ),
}


def _rewrite_refs(node: Any) -> Any:
    """Copy `node`, pointing published `$ref`s at this document's `$defs`."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(PUBLISHED_REF_PREFIX):
                value = LOCAL_REF_PREFIX + value.removeprefix(PUBLISHED_REF_PREFIX)
            out[key] = _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(item) for item in node]
    return node


def collect_refs(node: Any) -> list[str]:
    """Every `$ref` value in `node`, depth first."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in collect_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in collect_refs(item)]
    return []


def build(published: dict[str, Any]) -> dict[str, Any]:
    """The complete, self-contained request schema."""
    schema = _rewrite_refs(published)
    if "#" in schema.get("$id", "").rstrip("#"):
        schema["$id"] = SCHEMA_ID
    schema["$defs"] = json.loads(json.dumps(DEFINITIONS))  # a deep copy, plain JSON
    dangling = sorted(
        {
            ref
            for ref in collect_refs(schema)
            if not ref.startswith(LOCAL_REF_PREFIX)
            or ref.removeprefix(LOCAL_REF_PREFIX) not in schema["$defs"]
        }
    )
    if dangling:
        raise ValueError(f"unresolved $ref(s): {', '.join(dangling)}")
    Draft202012Validator.check_schema(schema)
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    schema = build(json.loads(args.source.read_text(encoding="utf-8")))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(
        f"wrote {args.output} ({len(schema['properties'])} properties, {len(schema['$defs'])} $defs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
