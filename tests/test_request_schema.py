"""The shipped request schema (data/): its content, its build script and where it is
loaded from (the validator built on it: test_request_validation.py).

Reads only data/ and the repo: /work/shared may be absent on a clean clone.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from flashserve.api.endpoints.request_schema import (
    REPO_SCHEMA_PATH,
    SCHEMA_PATH_ENV,
    find_schema_path,
    load_schema,
)
from tests.request_bodies import PUBLISHED_PROPERTIES, REPO, SCHEMA_FILE

DEFINITIONS = {
    "ChatCompletionMessage",
    "StreamOptions",
    "ResponseFormatText",
    "ResponseFormatJsonObject",
    "ResponseFormatJson",
    "ResponseFormatGrammar",
    "ResponseFormatStructuralTag",
    "ChatCompletionToolsParam",
    "FunctionDefinition",
    "ChatCompletionNamedToolChoiceParam",
    "DisaggregatedParams",
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _resolve_pointer(root: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"non-local $ref {ref}"
    node: Any = root
    for token in ref[2:].split("/"):
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


# --------------------------------------------------------------------------- the schema file


def test_schema_is_valid_draft_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_schema_has_exactly_the_published_properties(schema: dict[str, Any]) -> None:
    assert len(PUBLISHED_PROPERTIES) == 43
    assert list(schema["properties"]) == PUBLISHED_PROPERTIES
    assert schema["required"] == ["messages", "model"]
    assert schema["additionalProperties"] is False


def test_schema_keeps_published_limits_and_defaults(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    assert props["max_tokens"] == {**props["max_tokens"], "default": 4096, "minimum": 1}
    assert props["max_tokens"]["maximum"] == 262144
    assert props["temperature"]["minimum"] == 0 and props["temperature"]["maximum"] == 4
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["default"] == 1
    assert props["stop"]["anyOf"][1]["maxItems"] == 32
    assert props["best_of"]["maximum"] == 1 and props["top_k"]["default"] == 50


def test_every_ref_resolves(schema: dict[str, Any]) -> None:
    refs = _refs(schema)
    assert refs, "the schema should reference its $defs"
    for ref in refs:
        assert ref.startswith("#/$defs/"), ref
        assert isinstance(_resolve_pointer(schema, ref), dict), ref
    assert not any("components" in ref for ref in refs)


def test_defs_are_complete_and_closed(schema: dict[str, Any]) -> None:
    assert set(schema["$defs"]) == DEFINITIONS
    for name, definition in schema["$defs"].items():
        if name == "ChatCompletionMessage":
            assert "additionalProperties" not in definition
        else:
            assert definition["additionalProperties"] is False, name


def test_shipped_file_matches_build_script(schema: dict[str, Any]) -> None:
    """data/ is what scripts/build_request_schema.py makes from the published schema."""
    spec = importlib.util.spec_from_file_location(
        "build_request_schema", REPO / "scripts" / "build_request_schema.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    published = json.loads(
        json.dumps({k: v for k, v in schema.items() if k != "$defs"}).replace(
            "#/$defs/", "#/components/schemas/"
        )
    )
    published["$id"] = "#/components/schemas/ChatCompletionRequest"
    assert script.build(published) == schema


# --------------------------------------------------------------------------- loading


def test_schema_path_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SCHEMA_PATH_ENV, raising=False)
    assert find_schema_path() == REPO_SCHEMA_PATH == SCHEMA_FILE
    copied = tmp_path / "schema.json"
    copied.write_text(SCHEMA_FILE.read_text())
    monkeypatch.setenv(SCHEMA_PATH_ENV, str(copied))
    assert find_schema_path() == copied
    assert find_schema_path(SCHEMA_FILE) == SCHEMA_FILE
    assert load_schema()["title"] == "ChatCompletionRequest"
    assert load_schema() is load_schema(copied)  # read once
