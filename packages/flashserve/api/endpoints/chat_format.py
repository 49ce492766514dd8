"""Chat's formatter: pieces of output -> chat.completion bodies and chat.completion.chunk
server-sent events (OpenAI's shapes)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from flashserve.api.endpoints.base import collect_pieces
from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.generation import GenerationRequest
from flashserve.api.frontend.output.response_parser import join_tool_calls
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.http.errors import error_detail, timeout_error
from flashserve.api.http.sse import sse
from flashserve.engine.async_engine import EngineDeadError, RequestTimeoutError

logger = logging.getLogger("flashserve.requests")

DONE = b"data: [DONE]\n\n"


def stream_error_event(exc: Exception, rid: str) -> bytes:
    """The event that ends an OpenAI-style stream `exc` broke after its headers were sent
    (chat and text completions): the error body the API would have answered with."""
    if isinstance(exc, EngineDeadError):
        detail = error_detail(f"The engine failed while generating: {exc}", 500, "engine_error")
    elif isinstance(exc, RequestTimeoutError):
        detail = timeout_error().detail
    else:
        logger.exception("stream %s failed", rid)
        detail = error_detail(f"Internal error: {type(exc).__name__}", 500, "internal")
    return sse({"error": detail})


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


@dataclass
class PreparedChat:
    """A chat request ready to generate."""

    request: ChatRequest
    generation: GenerationRequest
    # `echo`: the continued assistant message, which opens the response content.
    echo: str = ""


async def collect_body(
    prepared: PreparedChat,
    first: Piece | None,
    pieces: AsyncIterator[Piece],
    http_request: Any,
    model: str,
) -> dict:
    generation = prepared.generation
    collected = await collect_pieces(first, pieces, http_request)
    logprobs: list[dict] | None = [] if prepared.request.logprobs else None
    tool_calls: list[dict] = []
    for piece in collected:
        tool_calls.extend(piece.tool_calls)
        if logprobs is not None and piece.logprobs:
            logprobs.extend(piece.logprobs)
    last = collected[-1] if collected else Piece(text="")
    message = assistant_message(
        prepared.echo + "".join(piece.text for piece in collected),
        "".join(piece.reasoning for piece in collected)
        if generation.parsing.thinking is not None
        else None,
        tool_calls,
    )
    body = completion(
        generation.request_id,
        generation.created,
        model,
        message,
        last.finish_reason,
        last.stop_reason,
        usage(
            last.prompt_tokens or len(generation.prompt_ids),
            last.completion_tokens,
            last.cached_tokens,
            last.reasoning_tokens,
        ),
        logprobs,
    )
    if last.disaggregated is not None:
        body["disaggregated_params"] = last.disaggregated
    return body


async def stream_events(
    prepared: PreparedChat, first: Piece | None, pieces: AsyncIterator[Piece], model: str
) -> AsyncIterator[bytes]:
    request, generation = prepared.request, prepared.generation
    rid, created = generation.request_id, generation.created
    prompt_tokens = len(generation.prompt_ids)

    def running_usage(piece: Piece | None) -> dict | None:
        if not request.continuous_usage:
            return None
        done = piece.completion_tokens if piece else 0
        cached = piece.cached_tokens if piece else 0
        thinking = piece.reasoning_tokens if piece else 0
        return usage(prompt_tokens, done, cached, thinking)

    try:
        yield sse(
            chunk(
                rid,
                created,
                model,
                {"role": "assistant", "content": prepared.echo},
                usage_body=running_usage(None),
            )
        )
        last = None
        piece = first
        while piece is not None:
            last = piece
            step = delta(piece.text, piece.reasoning, piece.tool_calls)
            if step or piece.logprobs or piece.finish_reason:
                body = chunk(
                    rid,
                    created,
                    model,
                    step,
                    piece.finish_reason,
                    piece.stop_reason,
                    piece.logprobs,
                    running_usage(piece),
                )
                if piece.disaggregated is not None:
                    body["disaggregated_params"] = piece.disaggregated
                yield sse(body)
            piece = await anext(pieces, None)
        if request.include_usage and last is not None:
            final = usage(
                prompt_tokens, last.completion_tokens, last.cached_tokens, last.reasoning_tokens
            )
            yield sse(usage_chunk(rid, created, model, final))
        yield DONE
    except Exception as exc:  # noqa: BLE001 - headers are sent: an event is all that is left
        yield stream_error_event(exc, rid)
    finally:
        await pieces.aclose()
