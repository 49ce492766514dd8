"""What the /v1/responses tests share: tools in the Responses API's flat form, prompts,
and helpers that run a ResponsesEndpoint in process and read its bodies and events
(tests/test_responses_api.py, test_responses_reasoning.py, test_responses_validation.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fastapi import HTTPException

from flashserve.api.endpoints.responses import ResponsesEndpoint
from tests.tool_calling_cases import TOOLS

FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
ASK = "What is the weather in Paris?"
STORY = "Tell me a story."


def parse_events(raw: str) -> list[dict[str, Any]]:
    """SSE text -> the events' JSON, checking each `event:` line names its data's type."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


async def _answer(endpoint: ResponsesEndpoint, body: dict[str, Any]) -> Any:
    response = await endpoint.create(body)
    if isinstance(response, dict):
        return response
    chunks = [c.decode() if isinstance(c, bytes) else c async for c in response.body_iterator]
    return parse_events("".join(chunks))


def answer(endpoint: ResponsesEndpoint, body: dict[str, Any]) -> Any:
    """The response body, or for a stream its events."""
    return asyncio.run(_answer(endpoint, body))


def refusal(endpoint: ResponsesEndpoint, body: Any) -> dict[str, Any]:
    """The error object of a refused request (asserting it is a 400)."""
    with pytest.raises(HTTPException) as caught:
        answer(endpoint, body)
    assert caught.value.status_code == 400, caught.value.detail
    return caught.value.detail


def output_text(body: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in body["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def final(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1]["response"]


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    """A response with its generated ids and times blanked, to compare two runs."""
    text = json.dumps(body)
    for item in body["output"]:
        text = text.replace(item["id"], "ID")
        if "call_id" in item:
            text = text.replace(item["call_id"], "CALL")
    out = json.loads(text.replace(body["id"], "RESP"))
    out["created_at"] = out["completed_at"] = 0
    # Prefix caching: a repeat of the same prompt finds it cached.
    out["usage"]["input_tokens_details"]["cached_tokens"] = 0
    return out
