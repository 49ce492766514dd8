"""The request validator built on the shipped schema: valid requests pass untouched,
invalid ones are 400s that name the field, and errors have OpenAI's shape.

Reads only data/ and the repo: /work/shared may be absent on a clean clone.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.chat_rules import check_semantics
from flashserve.api.endpoints.request_schema import RequestValidator, check_depth
from flashserve.api.http.body import parse_json_body
from flashserve.api.http.errors import RequestError, error_body
from flashserve.api.http.field_text import format_path
from tests.request_bodies import PUBLISHED_PROPERTIES, RESPONSE_FORMATS, SCHEMA_FILE, minimal, rich


@pytest.fixture(scope="module")
def validator() -> RequestValidator:
    return RequestValidator(SCHEMA_FILE)


# --------------------------------------------------------------------------- valid requests


def test_minimal_request_is_valid(validator: RequestValidator) -> None:
    assert validator.validate(minimal()) == minimal()


@pytest.mark.parametrize("kind", sorted(RESPONSE_FORMATS))
def test_rich_request_is_valid(validator: RequestValidator, kind: str) -> None:
    body = rich(RESPONSE_FORMATS[kind])
    assert set(body) == set(PUBLISHED_PROPERTIES)
    # Valid, and passed on as sent but for top-level nulls (which mean "not set").
    assert validator.validate(body) == {k: v for k, v in body.items() if v is not None}


def test_multimodal_validator_accepts_media_parts() -> None:
    body = minimal()
    body["messages"][0]["content"] = [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    assert RequestValidator(SCHEMA_FILE, multimodal=True).validate(body) == body
    with pytest.raises(RequestError) as caught:  # the text-only validator refuses them
        RequestValidator(SCHEMA_FILE).validate(body)
    assert caught.value.param == "messages[0].content[1]"


def test_message_keeps_unknown_keys(validator: RequestValidator) -> None:
    body = minimal()
    body["messages"][0]["refusal"] = None
    validated = validator.validate(body)
    assert validated["messages"][0] == {**minimal()["messages"][0], "refusal": None}
    request = ChatRequest.model_validate(validated)
    assert "refusal" in request.messages[0]


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
    assert parse_json_body(b'{"a": 1}', 1 << 20) == {"a": 1}
    for raw in (b"{", b"\xff", b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(RequestError) as caught:
            parse_json_body(raw, 1 << 20)
        assert caught.value.status == 400
    with pytest.raises(RequestError, match="the limit is 4"):
        parse_json_body(b"[1, 2, 3]", 4)


def test_check_semantics_tolerates_wrong_types() -> None:
    # Used alone (without the schema), wrong types are left to the schema, not crashed on.
    body = {"model": "m", "messages": "x", "n": "2", "logit_bias": [], "bad_token_ids": "1"}
    assert check_semantics(body) is None
    with pytest.raises(RequestError) as caught:  # ... where the schema refuses them
        RequestValidator(SCHEMA_FILE).validate(body)
    assert caught.value.status == 400 and caught.value.param


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
