"""Speculative decoding through the real Truss server and the official openai client.

A private server runs the production settings with `speculative_method: ngram` (the
measured per-step rule on). The streamed text equals the non-streamed text, forced
tool calls and json_schema answers are valid, and /metrics shows the drafts.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.private_server import PrivateServer, private_server_fixture
from tests.tool_calling_cases import SCHEMAS, TOOLS

pytest_plugins = ["tests.server_fixture"]

spec_server = private_server_fixture(
    {"speculative_method": "ngram", "num_speculative_tokens": 4}, "spec_server"
)
# A prompt the reply copies: a random model's greedy text loops anyway.
MESSAGES = [{"role": "user", "content": "Say it again and again: one two three four five."}]
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(spec_server: PrivateServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{spec_server.url}/v1", api_key="unused", max_retries=0, timeout=120
    )


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10, follow_redirects=True).text
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def streamed_text(client: openai.OpenAI, **kwargs) -> tuple[str, list[str]]:
    text, finishes = "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
    return text, finishes


def test_streamed_text_equals_the_whole_answer(
    client: openai.OpenAI, spec_server: PrivateServer
) -> None:
    for kwargs in (
        dict(temperature=0, max_tokens=64),
        dict(temperature=0.7, top_p=0.9, seed=5, max_tokens=48, frequency_penalty=0.2),
    ):
        whole = client.chat.completions.create(model="m", messages=MESSAGES, **kwargs)
        text, finishes = streamed_text(client, model="m", messages=MESSAGES, **kwargs)
        assert text == whole.choices[0].message.content
        assert finishes == [whole.choices[0].finish_reason]
    assert metric(spec_server.url, "flashserve_spec_draft_tokens") > 0
    assert metric(spec_server.url, "flashserve_spec_accepted_tokens") > 0


def test_tools_and_json_schema_stay_valid(client: openai.OpenAI) -> None:
    for tool_choice in ("required", {"type": "function", "function": {"name": "add"}}):
        whole = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=tool_choice,
            temperature=0,
            max_tokens=300,
        )
        calls = whole.choices[0].message.tool_calls
        assert whole.choices[0].finish_reason == "tool_calls" and calls
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}
    kwargs = dict(model="m", messages=MESSAGES, response_format=response_format, max_tokens=200)
    whole = client.chat.completions.create(temperature=0, **kwargs)
    jsonschema.validate(json.loads(whole.choices[0].message.content), ITEM)
    text, _ = streamed_text(client, temperature=0, **kwargs)
    assert text == whole.choices[0].message.content
