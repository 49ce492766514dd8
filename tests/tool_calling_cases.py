"""The tools the tool-calling tests declare, requests that use them, and the checks of
what comes back (a message's calls, a stream's deltas joined as OpenAI clients do).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from flashserve.api.chat import ChatService

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 8},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -50, "maximum": 50},
                    "b": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                    "tags": {"type": "array", "items": {"enum": ["news", "web"]}, "maxItems": 2},
                    "exact": {"type": "boolean"},
                },
                "required": ["query"],
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMES = ["hermes", "llama3", "mistral"]


def request(family: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 400}
    if family == "hermes":
        # Forced calls and thinking: the tests of thinking are in test_reasoning.py.
        body["chat_template_args"] = {"enable_thinking": False}
    body.update(fields)
    return body


def eos_id(service: ChatService) -> int:
    return service.engine.engine.eos_token_ids[0]


def assert_valid_calls(response: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    choice = response["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    assert choice["finish_reason"] == "tool_calls", choice
    assert calls and choice["message"]["content"] is None, choice
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])
    return calls


def streamed_message(events: list[Any]) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(content, calls, finish reasons) joined from a stream the way OpenAI clients do,
    checking the shape of each tool-call delta on the way."""
    content, calls, finishes = "", {}, []
    for event in events:
        if not isinstance(event, dict) or not event.get("choices"):
            continue
        choice = event["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        assert "<tool_call>" not in content and "[TOOL_CALLS]" not in content
        for piece in delta.get("tool_calls") or []:
            if piece["index"] not in calls:
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                calls[piece["index"]] = {
                    "name": piece["function"]["name"],
                    "arguments": piece["function"].get("arguments", ""),
                }
            else:
                assert set(piece) == {"index", "function"}
                assert set(piece["function"]) == {"arguments"}
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    return content, [calls[i] for i in sorted(calls)], finishes


def plain(calls: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
