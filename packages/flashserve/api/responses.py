"""OpenAI-shaped response bodies and server-sent-event framing."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0
) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def completion(
    request_id: str,
    created: int,
    model: str,
    message: dict[str, Any],
    finish_reason: str | None,
    stop_reason: int | str | None,
    usage_body: dict,
    logprobs: list[dict] | None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
        "usage": usage_body,
    }


def chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
    logprobs: list[dict] | None = None,
    usage_body: dict | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def usage_chunk(request_id: str, created: int, model: str, usage_body: dict) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_body,
    }


def delta(content: str, reasoning: str = "", tool_calls: list[dict] | None = None) -> dict:
    """A chunk's delta: only the fields this step has something for."""
    body: dict[str, Any] = {}
    if content:
        body["content"] = content
    if reasoning:
        body["reasoning_content"] = reasoning
    if tool_calls:
        body["tool_calls"] = tool_calls
    return body


def assistant_message(
    content: str, reasoning: str | None = None, tool_call_deltas: list[dict] | None = None
) -> dict[str, Any]:
    """The non-streamed message: what joining the streamed deltas gives.

    `reasoning` None leaves `reasoning_content` out (the model does not think); a call
    turn without text has `content: null`, as OpenAI sends it.
    """
    calls = join_tool_calls(tool_call_deltas or [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
        if not content:
            message["content"] = None
    if reasoning is not None:
        message["reasoning_content"] = reasoning or None
    return message


def join_tool_calls(deltas: list[dict]) -> list[dict]:
    """Tool-call deltas -> complete calls, the way OpenAI clients accumulate a stream."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in deltas:
        function = piece.get("function", {})
        call = calls.get(piece["index"])
        if call is None:
            call = calls[piece["index"]] = {
                "id": piece.get("id"),
                "type": "function",
                "function": {"name": function.get("name"), "arguments": ""},
            }
        call["function"]["arguments"] += function.get("arguments", "")
    return [calls[index] for index in sorted(calls)]
