"""Tool calls through the official openai client against the real Truss server,
streamed and not.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.tool_calling_cases import ASK, SCHEMAS, TOOLS

pytest_plugins = ["tests.server_fixture"]


@pytest.fixture(scope="module")
def client(truss_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_openai_client_tool_calls_streamed_and_not(client: openai.OpenAI, tool_choice) -> None:
    kwargs = dict(
        model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1, seed=11,
        max_tokens=300, parallel_tool_calls=tool_choice == "required",
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if tool_choice != "required":
        assert [call.function.name for call in calls] == ["get_weather"]

    streamed: dict[int, dict[str, str]] = {}
    finishes = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or []:
            if piece.index not in streamed:
                assert piece.id and piece.type == "function" and piece.function.name
                streamed[piece.index] = {"name": piece.function.name, "arguments": ""}
            streamed[piece.index]["arguments"] += piece.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["tool_calls"]
    assert [streamed[i] for i in sorted(streamed)] == [
        {"name": call.function.name, "arguments": call.function.arguments} for call in calls
    ]
