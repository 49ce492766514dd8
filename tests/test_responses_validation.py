"""/v1/responses refusals: every invalid request is a 400 naming its field (the
embedded model's endpoint, tests/responses_fixtures.py)."""

from __future__ import annotations

import pytest

from flashserve.api.endpoints.responses import ResponsesEndpoint
from tests.responses_support import FLAT_TOOLS, refusal
from tests.tool_calling_cases import TOOLS

pytest_plugins = ["tests.responses_fixtures"]


# --------------------------------------------------------------------------- refusals

REFUSED = [
    ({"input": "x", "temprature": 1}, "temprature"),
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "top_p": 0}, "top_p"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
        "input[0].content[0]",
    ),
    (
        {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]},
        "input[0].encrypted_content",
    ),
    (
        {
            "input": [
                {"role": "user", "content": "x"},
                {"type": "function_call_output", "call_id": "call_9", "output": "1"},
            ]
        },
        "input[1].call_id",
    ),  # fmt: skip
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    ({"input": "x", "tools": TOOLS}, "tools[0].function"),
    (
        {
            "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}],
        },
        "tools[0].parameters",
    ),
    (
        {"input": "x", "tools": [{"type": "function", "name": "f", "extra": 1}]},
        "tools[0].extra",
    ),
    (
        {"input": "x", "tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
        "tool_choice.name",
    ),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    (
        {
            "input": "x",
            "tools": FLAT_TOOLS,
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "nope"}],
            },
        },
        "tool_choice.tools[0].name",
    ),  # fmt: skip
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    (
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format.schema",
    ),
    (
        {
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "wrong"}}},
        },
        "text.format.schema",
    ),  # fmt: skip
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include[0]"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"input": "x", "stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"input": "x" * 200_000}, "input"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED, ids=[param for _, param in REFUSED])
def test_refusals_name_the_field(responses: ResponsesEndpoint, body: dict, param: str) -> None:
    error = refusal(responses, body)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"]


@pytest.mark.parametrize(
    "items",
    [
        [{"type": ["message"], "role": "user", "content": "x"}],
        [{"type": {"type": "x"}, "call_id": "c", "output": "1"}],
        [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}],
        [{"role": "user", "content": [{"type": {}, "text": "x"}]}],
    ],
)
def test_a_type_that_is_not_a_string_is_a_400(responses: ResponsesEndpoint, items: list) -> None:
    """An item's or a part's `type` of the wrong JSON type is refused, never a 500 (it was
    looked up in a set of names before the schema check)."""
    error = refusal(responses, {"input": items})
    assert error["param"].startswith("input[0]"), error


def test_a_body_that_is_not_an_object(responses: ResponsesEndpoint) -> None:
    error = refusal(responses, ["input"])
    assert error["param"] is None and "JSON object" in error["message"]
