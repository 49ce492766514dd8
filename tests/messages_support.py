"""What the /v1/messages tests share: a tiny thinking, tool-calling model and helpers
that run a MessagesEndpoint in process.

The model is the "hermes" family of tests/tool_models.py (Qwen3-style ChatML, Hermes
tool calls) with tests/chat_templates/hermes_thinking.jinja, whose generation prompt
opens the <think> block when thinking is on, so a random model's output is reasoning
until it closes the block; with thinking off the block is closed in the prompt.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import HTTPException

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.messages import MessagesEndpoint
from tests.tool_models import build_family, template

# Tools whose arguments a forced call completes in a few tokens even on a random model.
TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "get_time",
        "description": "Local time in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def build_thinking_model(sp_tokenizer_dir: Path, out_dir: Path) -> Path:
    """The hermes family with the thinking-opening template, written to out_dir."""
    from transformers import AutoTokenizer

    build_family("hermes", sp_tokenizer_dir, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    tokenizer.chat_template = template("hermes_thinking.jinja")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def body(**fields: Any) -> dict[str, Any]:
    """A greedy Messages request for ASK with thinking off, with `fields` on top (a field
    set to None is left out)."""
    request = {
        "model": "m",
        "messages": ASK,
        "max_tokens": 12,
        "temperature": 0,
        "thinking": {"type": "disabled"},
        **fields,
    }
    return {key: value for key, value in request.items() if value is not None}


def parse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic-framed SSE text -> [(event name, data)]; each name must match data's type."""
    events = []
    for frame in raw.split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"], frame
        events.append((lines["event"], data))
    return events


async def answer(endpoint: MessagesEndpoint | ChatEndpoint, request: dict[str, Any]) -> Any:
    """The JSON body, or for a stream its raw text."""
    response = await endpoint.create(request)
    if isinstance(response, dict):
        return response
    chunks = []
    async for raw in response.body_iterator:
        chunks.append(raw.decode() if isinstance(raw, bytes) else raw)
    return "".join(chunks)


def call(endpoint: MessagesEndpoint | ChatEndpoint, request: dict[str, Any]) -> Any:
    """One request on a fresh event loop: a body, or a stream's [(event, data)]."""
    result = asyncio.run(answer(endpoint, request))
    return result if isinstance(result, dict) else parse_events(result)


def streamed_message(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The message a client assembles from the events (checking their order as it goes)."""
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    message = events[0][1]["message"]
    assert message["content"] == [] and message["stop_reason"] is None
    arguments: dict[int, str] = {}
    open_index = None
    for name, data in events[1:]:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(message["content"])
            open_index = data["index"]
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            assert data["index"] == open_index
            block, delta = message["content"][open_index], data["delta"]
            kind = delta["type"]
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = delta["signature"]
            elif kind == "input_json_delta":
                arguments[open_index] = arguments.get(open_index, "") + delta["partial_json"]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            if open_index in arguments:
                message["content"][open_index]["input"] = json.loads(arguments[open_index])
            open_index = None
        elif name == "message_delta":
            assert open_index is None
            message.update(data["delta"])
            message["usage"] = data["usage"]
    return message


def refusal(endpoint: MessagesEndpoint, request: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(HTTPException) as caught:
        call(endpoint, request)
    assert caught.value.status_code == 400
    return caught.value.detail


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """The message less what differs between two runs of one request: ids, and how much
    of the prompt the prefix cache held."""
    blocks = [{k: v for k, v in b.items() if k != "id"} for b in message["content"]]
    usage = message["usage"]
    return {
        **{k: v for k, v in message.items() if k != "id"},
        "content": blocks,
        "usage": (usage["input_tokens"] + usage["cache_read_input_tokens"], usage["output_tokens"]),
    }


# A tool call and its result, as content blocks.
CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"city": "Oslo"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}
