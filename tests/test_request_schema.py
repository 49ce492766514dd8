"""The shipped request schema (data/) and the validator built on it.

Reads only data/ and the repo: /work/shared may be absent on a clean clone.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from flashserve.api.errors import RequestError, error_body
from flashserve.api.schema import (
    REPO_SCHEMA_PATH,
    SCHEMA_PATH_ENV,
    RequestValidator,
    check_depth,
    check_semantics,
    find_schema_path,
    format_path,
    load_schema,
    parse_json_body,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "data" / "ChatCompletionRequest.schema.json"

# The 43 properties of Baseten's published ChatCompletionRequest, in its order.
PUBLISHED_PROPERTIES = [
    "messages",
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "best_of",
    "top_k",
    "top_p_min",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "early_stopping",
    "bad",
    "bad_token_ids",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "echo",
    "add_generation_prompt",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_args",
    "disaggregated_params",
]

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

RESPONSE_FORMATS = {
    "text": {"type": "text"},
    "json_object": {"type": "json_object"},
    "json_schema": {
        "type": "json_schema",
        "json_schema": {
            "name": "weather",
            "description": "A weather report",
            "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True,
        },
    },
    "grammar": {"type": "grammar", "grammar": 'root ::= "yes" | "no"'},
    "structural_tag": {
        "type": "structural_tag",
        "structural_tag": '{"structures": [], "triggers": []}',
    },
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator() -> RequestValidator:
    return RequestValidator(SCHEMA_FILE)


def minimal() -> dict[str, Any]:
    return {"model": "flashserve", "messages": [{"role": "user", "content": "Hello"}]}


def rich(response_format: dict[str, Any]) -> dict[str, Any]:
    """A request that sets every one of the 43 fields to something valid."""
    return {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "name": "ana",
                "content": [
                    {"type": "text", "text": "What is the weather"},
                    {"type": "text", "text": " in Paris?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "index": 0,
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        ],
        "model": "flashserve",
        "frequency_penalty": 0.5,
        "logit_bias": {"42": -100, "7": 2.5},
        "logprobs": True,
        "top_logprobs": 5,
        "max_tokens": 512,
        "n": 1,
        "presence_penalty": -0.5,
        "response_format": response_format,
        "seed": 1234,
        "stop": ["\n\n", "END"],
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": False},
        "temperature": 0.7,
        "top_p": 0.9,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "strict": True,
                },
            },
            {"function": {"name": "no_args"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "user": "user-123",
        "best_of": 1,
        "top_k": 40,
        "top_p_min": 0.1,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "length_penalty": 1.0,
        "early_stopping": False,
        "bad": ["darn"],
        "bad_token_ids": [13, 0],
        "stop_token_ids": [2],
        "include_stop_str_in_output": True,
        "ignore_eos": False,
        "min_tokens": 4,
        "skip_special_tokens": True,
        "spaces_between_special_tokens": True,
        "truncate_prompt_tokens": 4096,
        "echo": False,
        "add_generation_prompt": True,
        "add_special_tokens": False,
        "documents": [{"title": "Paris", "text": "Capital of France."}],
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "chat_template_args": {"enable_thinking": False, "nested": {"ok": [1, 2]}},
        "disaggregated_params": {
            "request_type": "generation_only",
            "first_gen_tokens": [17],
            "ctx_request_id": 99,
            "opaque_state": "b64state",
            "draft_tokens": [1, 2, 3],
            "multimodal_embedding_handles": [{"handle": 1}],
            "multimodal_hashes": [[1, 2], [3]],
        },
    }


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


# --------------------------------------------------------------------------- valid requests


def test_minimal_request_is_valid(validator: RequestValidator) -> None:
    validator.validate(minimal())


@pytest.mark.parametrize("kind", sorted(RESPONSE_FORMATS))
def test_rich_request_is_valid(validator: RequestValidator, kind: str) -> None:
    body = rich(RESPONSE_FORMATS[kind])
    assert set(body) == set(PUBLISHED_PROPERTIES)
    validator.validate(body)


def test_multimodal_validator_accepts_media_parts() -> None:
    body = minimal()
    body["messages"][0]["content"] = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    RequestValidator(SCHEMA_FILE, multimodal=True).validate(body)


def test_message_keeps_unknown_keys(validator: RequestValidator) -> None:
    body = minimal()
    body["messages"][0]["refusal"] = None
    validator.validate(body)


def test_validation_does_not_modify_the_body(validator: RequestValidator) -> None:
    body = rich(RESPONSE_FORMATS["json_schema"])
    before = copy.deepcopy(body)
    validator.validate(body)
    assert body == before


# --------------------------------------------------------------------------- invalid requests

DROP = object()


def _deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(levels):
        node["x"] = {}
        node = node["x"]
    return root


def _message(**fields: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "hi", **fields}]


# (case id, fields to set or DROP, expected param, words the message must contain)
INVALID = [
    ("unknown field", {"foo": 1}, "foo", ["Unknown field 'foo'"]),
    ("temperature type", {"temperature": "hot"}, "temperature", ["number"]),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens", ["at least 1"]),
    ("max_tokens huge", {"max_tokens": 300000}, "max_tokens", ["262144"]),
    ("top_p 0", {"top_p": 0}, "top_p", ["greater than 0"]),
    ("stop 33 items", {"stop": ["x"] * 33}, "stop", ["32", "accepts"]),
    ("stop empty string", {"stop": ""}, "stop", ["at least 1", "accepts"]),
    ("stop wrong type", {"stop": 5}, "stop", ["a string", "an array"]),
    ("n 2", {"n": 2}, "n", ["must be 1"]),
    ("best_of 2", {"best_of": 2}, "best_of", ["at most 1"]),
    (
        "json_schema without json_schema",
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        ["Missing required field", '"type": "json_object"', '"type": "grammar"'],
    ),
    (
        "response_format unknown key",
        {"response_format": {"type": "text", "foo": 1}},
        "response_format.foo",
        ["Unknown field", '"type": "structural_tag"'],
    ),
    (
        "response_format unknown type",
        {"response_format": {"type": "yaml"}},
        "response_format",
        ['"type": "text"', '"type": "json_schema"'],
    ),
    (
        "tool_choice without function",
        {"tool_choice": {"type": "function"}},
        "tool_choice.function",
        ["Missing required field", '"auto"', '"type": "function"'],
    ),
    ("tool_choice bad string", {"tool_choice": "always"}, "tool_choice", ['"required"']),
    (
        "role robot",
        {"messages": [{"role": "robot", "content": "x"}]},
        "messages[0].role",
        ["robot"],
    ),
    ("missing model", {"model": DROP}, "model", ["Missing required field"]),
    ("missing messages", {"messages": DROP}, "messages", ["Missing required field"]),
    ("empty messages", {"messages": []}, "messages", ["at least one"]),
    (
        "image to text model",
        {"messages": _message(content=[{"type": "image_url", "image_url": {"url": "u"}}])},
        "messages[0].content[0]",
        ["text-only"],
    ),
    (
        "audio to text model",
        {
            "messages": _message(
                content=[{"type": "input_audio", "input_audio": {"data": "A", "format": "wav"}}]
            )
        },
        "messages[0].content[0]",
        ["text-only"],
    ),
    (
        "content part without text",
        {"messages": _message(content=[{"type": "text"}])},
        "messages[0].content[0].text",
        ["Missing required field", '"type": "image_url"'],
    ),
    (
        "tool message without tool_call_id",
        {"messages": [{"role": "tool", "content": "42"}]},
        "messages[0].tool_call_id",
        ["tool call"],
    ),
    ("logit_bias 200", {"logit_bias": {"5": 200}}, "logit_bias.5", ["-100 and 100"]),
    ("logit_bias key", {"logit_bias": {"five": 1}}, "logit_bias.five", ["token ID"]),
    ("top_logprobs 21", {"top_logprobs": 21, "logprobs": True}, "top_logprobs", ["0 and 20"]),
    ("top_logprobs needs logprobs", {"top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    (
        "stream_options without stream",
        {"stream_options": {"include_usage": True}},
        "stream_options",
        ["stream"],
    ),
    (
        "stream_options unknown key",
        {"stream": True, "stream_options": {"usage": True}},
        "stream_options.usage",
        ["Unknown field"],
    ),
    ("min_tokens over max", {"min_tokens": 9, "max_tokens": 8}, "min_tokens", ["max_tokens"]),
    ("top_k -2", {"top_k": -2}, "top_k", ["-1"]),
    ("min_p 1.5", {"min_p": 1.5}, "min_p", ["between 0 and 1"]),
    ("top_p_min over top_p", {"top_p": 0.5, "top_p_min": 0.6}, "top_p_min", ["top_p"]),
    ("repetition_penalty 0", {"repetition_penalty": 0}, "repetition_penalty", ["greater than 0"]),
    ("frequency_penalty 3", {"frequency_penalty": 3}, "frequency_penalty", ["-2 and 2"]),
    ("presence_penalty -3", {"presence_penalty": -3}, "presence_penalty", ["-2 and 2"]),
    ("negative bad token", {"bad_token_ids": [1, -4]}, "bad_token_ids[1]", [">= 0"]),
    ("negative stop token", {"stop_token_ids": [-1]}, "stop_token_ids[0]", [">= 0"]),
    (
        "tool without name",
        {"tools": [{"type": "function", "function": {"description": "d"}}]},
        "tools[0].function.name",
        ["Missing required field"],
    ),
    (
        "disaggregated without request_type",
        {"disaggregated_params": {"ctx_request_id": 1}},
        "disaggregated_params.request_type",
        ["Missing required field"],
    ),
    ("seed boolean", {"seed": True}, "seed", ["integer"]),
    ("NaN temperature", {"temperature": float("nan")}, "temperature", ["non-finite"]),
    ("deep nesting", {"chat_template_args": _deep(80)}, "chat_template_args", ["nested"]),
]


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_request(
    validator: RequestValidator, fields: dict[str, Any], param: str, words: list[str]
) -> None:
    body = minimal()
    for key, value in fields.items():
        if value is DROP:
            body.pop(key)
        else:
            body[key] = value
    with pytest.raises(RequestError) as caught:
        validator.validate(body)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "invalid_request", param)
    assert param in error.message
    for word in words:
        assert word in error.message
    assert error.to_body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_body_must_be_an_object(validator: RequestValidator, body: object) -> None:
    with pytest.raises(RequestError, match="JSON object") as caught:
        validator.validate(body)
    assert caught.value.status == 400 and caught.value.param is None


def test_oversized_body_is_rejected_before_the_schema() -> None:
    small = RequestValidator(SCHEMA_FILE, max_bytes=1000)
    body = minimal()
    body["messages"][0]["content"] = "x" * 2000
    with pytest.raises(RequestError, match="larger than") as caught:
        small.validate(body)
    assert caught.value.status == 400


def test_too_many_values_are_rejected_before_the_schema() -> None:
    body = minimal()
    body["bad_token_ids"] = list(range(101))
    with pytest.raises(RequestError, match="more than 100 JSON values") as caught:
        RequestValidator(SCHEMA_FILE, max_values=100).validate(body)
    assert caught.value.param == "bad_token_ids"
    RequestValidator(SCHEMA_FILE, max_values=200).validate(body)


def test_check_depth_limits() -> None:
    check_depth({"a": _deep(62)})  # 64 levels including the body itself
    with pytest.raises(RequestError) as caught:
        check_depth({"a": _deep(63)})
    assert caught.value.param == "a"
    check_depth(_deep(10), max_depth=11)
    with pytest.raises(RequestError):
        check_depth(_deep(10), max_depth=10)


def test_parse_json_body() -> None:
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"\xff", "[" * 100_000 + "]" * 100_000):
        with pytest.raises(RequestError) as caught:
            parse_json_body(raw)
        assert caught.value.status == 400
    with pytest.raises(RequestError, match="larger than"):
        parse_json_body(b"[1, 2, 3]", max_bytes=4)


def test_check_semantics_tolerates_wrong_types() -> None:
    # Used alone (without the schema), wrong types are left to the schema, not crashed on.
    check_semantics({"messages": "x", "n": "2", "logit_bias": [], "bad_token_ids": "1"})


# --------------------------------------------------------------------------- error bodies


def test_error_bodies_are_openai_shaped() -> None:
    assert RequestError("bad", param="n", code="invalid_request").to_body() == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "n",
            "code": "invalid_request",
        }
    }
    busy = RequestError("loading", status=503, headers={"Retry-After": "5"})
    assert busy.to_body()["error"]["type"] == "service_unavailable_error"
    assert busy.headers == {"Retry-After": "5"}
    assert RequestError("boom", status=500).to_body()["error"]["type"] == "internal_server_error"
    assert RequestError("x", status=400, err_type="custom").to_body()["error"]["type"] == "custom"
    assert str(busy) == "loading"
    assert error_body("m", "t") == {
        "error": {"message": "m", "type": "t", "param": None, "code": None}
    }


def test_format_path() -> None:
    assert format_path(["messages", 0, "content", 1]) == "messages[0].content[1]"
    assert format_path([]) is None
