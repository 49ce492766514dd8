"""/v1/messages in process: request validation, Anthropic's error shapes and the 529 of an
overloaded engine (the mapping, replies and stream are tests/test_messages_api.py)."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from flashserve.api.endpoints.messages import MessagesEndpoint, anthropic_error
from flashserve.api.http.errors import RequestError
from tests.messages_support import (
    ASK,
    CALL,
    RESULT,
    TOOLS,
    body,
    refusal,
)

pytest_plugins = ["tests.tokenizer_fixtures", "tests.messages_fixtures"]


# --------------------------------------------------------------------------- validation

USER_IMAGE = {"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperatur": 0.5}, "temperatur", "Unknown field 'temperatur'"),
        ({"max_tokens": "12"}, "max_tokens", "expected an integer"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", '"user"'),
        ({"messages": [USER_IMAGE]}, "messages[0].content[0]", "is an image block"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0]",
            "is a document block",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "txt", "text": "x"}]}]},
            "messages[0].content[0]",
            '{"type": "text", "text": "..."}',
        ),
        ({"messages": [{"role": "user", "content": [CALL]}]}, "messages[0].content[0]", "user"),
        (
            {"messages": [{"role": "user", "content": [RESULT]}]},
            "messages[0].content[0].tool_use_id",
            "no earlier assistant message",
        ),
        (
            {"messages": [*ASK, {"role": "assistant", "content": [CALL]}]},
            "messages[1].content[0]",
            "prefill text only",
        ),
        (  # a tool_use left unanswered by the next turn
            {
                "messages": [
                    *ASK,
                    {"role": "assistant", "content": [CALL]},
                    {"role": "user", "content": "never mind"},
                ]
            },
            "messages[2].content",
            "without tool_result blocks immediately after: 'toolu_1'",
        ),
        (  # assistant messages in a row are one turn: its call is answered after the run
            {
                "messages": [
                    *ASK,
                    {"role": "assistant", "content": [CALL]},
                    {"role": "assistant", "content": "and"},
                    {"role": "user", "content": "go on"},
                ]
            },
            "messages[3].content",
            "'toolu_1'",
        ),
        (  # its result in a later turn is not enough either
            {
                "messages": [
                    *ASK,
                    {"role": "assistant", "content": [CALL]},
                    {"role": "user", "content": [{"type": "text", "text": "wait"}]},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": [RESULT]},
                ]
            },
            "messages[2].content",
            "corresponding tool_result block in the next message",
        ),
        ({"temperature": 2.5}, "temperature", "at most 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -1}, "top_k", "at least 0"),
        ({"stop_sequences": [""]}, "stop_sequences[0]", "at least 1 character"),
        ({"stop_sequences": "END"}, "stop_sequences", "expected an array"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens", "Missing required"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 12}},
            "thinking.budget_tokens",
            "less than 'max_tokens' (12)",
        ),
        ({"thinking": {"type": "sometimes"}}, "thinking", "expected"),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "declares no tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
            "tool_choice.name",
            "not a declared tool",
        ),
        (
            {"tools": [{**TOOLS[0], "name": "get weather"}]},
            "tools[0].name",
            "letters, digits",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].name", "unique"),
        (
            {"tools": [{**TOOLS[0], "input_schema": {"type": "string"}}]},
            "tools[0].input_schema",
            "must describe an object",
        ),
        ({"tools": [{"name": "x"}]}, "tools[0].input_schema", "Missing required"),
        (
            {"tools": [{**TOOLS[0], "type": "web_search_20250305"}]},
            "tools[0].type",
            '"custom"',
        ),
        (  # a server tool as Anthropic's docs write it: no input_schema
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
            "tools[0].type",
            '"custom"',
        ),
        (
            {"tools": [TOOLS[0], {"type": "bash_20250124", "name": "bash"}]},
            "tools[1].type",
            "server tools",
        ),
        ({"metadata": {"user_id": 7}}, "metadata.user_id", "expected a string or null"),
        ({"output_config": {"effort": "high"}}, "output_config.effort", "Unknown field"),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": 3}}}},
            "output_config.format.schema",
            "not a valid JSON Schema",
        ),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    messages: MessagesEndpoint, fields: dict[str, Any], param: str, words: str
) -> None:
    request = body(**fields)
    detail = refusal(messages, request)
    assert detail["param"] == param, detail
    assert words in detail["message"] and param in detail["message"], detail


def test_a_tool_use_is_answered_by_the_next_turn_whatever_its_messages(
    messages: MessagesEndpoint,
) -> None:
    # Messages of one role in a row are one turn (they merge): the call is answered.
    request = body(
        messages=[
            *ASK,
            {"role": "assistant", "content": [CALL]},
            {"role": "assistant", "content": "and"},
            {"role": "user", "content": "one moment"},
            {"role": "user", "content": [RESULT]},
        ],
        tools=TOOLS,
    )
    chat = messages.validator.parse(request).chat.messages
    assert [m["role"] for m in chat][-2:] == ["user", "tool"]


FULL_BODY = body(
    system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    messages=[
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}, CALL]},
        {"role": "user", "content": [RESULT, {"type": "text", "text": "and?"}]},
    ],
    tools=TOOLS,
    tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    thinking={"type": "enabled", "budget_tokens": 4},
    stop_sequences=["x"],
    top_p=0.5,
    top_k=3,
    metadata={"user_id": "u"},
    output_config={"format": None},
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*path, i))
    return out


PATHS = _paths(FULL_BODY)[1:]


@settings(max_examples=150, deadline=None, database=None)
@given(where=st.sampled_from(PATHS), value=JSON_VALUES)
def test_any_value_anywhere_is_accepted_or_a_400(
    messages: MessagesEndpoint, where: tuple, value: Any
) -> None:
    request = copy.deepcopy(FULL_BODY)
    node = request
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    try:
        messages.prepare(request)
    except RequestError as exc:
        assert exc.status == 400 and exc.message


def test_a_prompt_longer_than_the_context_is_a_400_about_messages(
    messages: MessagesEndpoint,
) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    detail = refusal(messages, body(messages=long))
    assert detail["param"] == "messages" and "truncate_prompt_tokens" not in detail["message"]


def test_errors_take_anthropics_shape() -> None:
    response = anthropic_error(400, {"message": "'x' is bad", "code": "invalid_request"})
    assert response.status_code == 400
    assert json.loads(response.body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'x' is bad"},
    }
    overloaded = anthropic_error(
        503, {"message": "busy", "code": "overloaded"}, {"Retry-After": "1"}
    )
    assert overloaded.status_code == 529 and overloaded.headers["retry-after"] == "1"
    assert json.loads(overloaded.body)["error"]["type"] == "overloaded_error"
    assert json.loads(anthropic_error(504, {"message": "late"}).body)["error"]["type"] == (
        "timeout_error"
    )
    assert json.loads(anthropic_error(503, {"message": "dead"}).body)["error"]["type"] == (
        "api_error"
    )


def http_request(payload: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Request:
    """A POST /v1/messages as the Truss server hands it to the model."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/messages",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
    }
    return Request(scope, receive)


def test_refusals_through_handle_take_anthropics_shape(messages: MessagesEndpoint) -> None:
    response = asyncio.run(messages.handle(http_request(b'{"model": "m"')))
    assert response.status_code == 400
    error = json.loads(response.body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in error["error"]["message"]
    late = http_request(json.dumps(body()).encode(), ((b"x-request-timeout", b"soon"),))
    response = asyncio.run(messages.handle(late))
    assert response.status_code == 400 and "x-request-timeout" in response.body.decode()


def test_an_overloaded_engine_is_a_529_overloaded_error(messages: MessagesEndpoint) -> None:
    engine = messages.frontend.engine
    saved, engine.max_queue_size = engine.max_queue_size, 0  # every request finds it full
    try:
        response = asyncio.run(messages.handle(http_request(json.dumps(body()).encode())))
    finally:
        engine.max_queue_size = saved
    assert response.status_code == 529 and response.headers["retry-after"] == "1"
    error = json.loads(response.body)["error"]
    assert error["type"] == "overloaded_error" and "overloaded" in error["message"]
