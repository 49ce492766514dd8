"""A request's pieces of output -> one JSON body, or a server-sent-event stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from flashserve.api import responses
from flashserve.api.http_errors import error_detail, http_error, timeout_error
from flashserve.api.pieces import Piece, PreparedRequest
from flashserve.engine.async_engine import EngineDeadError, RequestTimeoutError

logger = logging.getLogger("flashserve.requests")

DISCONNECT_POLL_SECONDS = 0.25


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its generator, so a dropped client aborts at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def collect_body(
    prepared: PreparedRequest,
    first: Piece | None,
    pieces: AsyncIterator[Piece],
    http_request: Any,
    model: str,
) -> dict:
    texts: list[str] = []
    thoughts: list[str] = []
    tool_calls: list[dict] = []
    logprobs: list[dict] | None = [] if prepared.request.logprobs else None
    last = Piece(text="")
    watcher = None
    if http_request is not None:
        watcher = asyncio.create_task(cancel_on_disconnect(http_request, asyncio.current_task()))
    try:
        piece = first
        while piece is not None:
            texts.append(piece.text)
            thoughts.append(piece.reasoning)
            tool_calls.extend(piece.tool_calls)
            if logprobs is not None and piece.logprobs:
                logprobs.extend(piece.logprobs)
            last = piece
            piece = await anext(pieces, None)
    except EngineDeadError as exc:
        raise http_error(500, f"The engine failed while generating: {exc}", "engine_error") from exc
    except RequestTimeoutError as exc:
        raise timeout_error() from exc
    finally:
        if watcher is not None:
            watcher.cancel()
        await pieces.aclose()
    message = responses.assistant_message(
        prepared.echo + "".join(texts),
        "".join(thoughts) if prepared.parsing.thinking is not None else None,
        tool_calls,
    )
    body = responses.completion(
        prepared.request_id,
        prepared.created,
        model,
        message,
        last.finish_reason,
        last.stop_reason,
        responses.usage(
            last.prompt_tokens or len(prepared.prompt_ids),
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
    prepared: PreparedRequest, first: Piece | None, pieces: AsyncIterator[Piece], model: str
) -> AsyncIterator[bytes]:
    request = prepared.request
    rid, created = prepared.request_id, prepared.created
    prompt_tokens = len(prepared.prompt_ids)

    def running_usage(piece: Piece | None) -> dict | None:
        if not request.continuous_usage:
            return None
        done = piece.completion_tokens if piece else 0
        cached = piece.cached_tokens if piece else 0
        thinking = piece.reasoning_tokens if piece else 0
        return responses.usage(prompt_tokens, done, cached, thinking)

    try:
        yield responses.sse(
            responses.chunk(
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
            delta = responses.delta(piece.text, piece.reasoning, piece.tool_calls)
            if delta or piece.logprobs or piece.finish_reason:
                body = responses.chunk(
                    rid,
                    created,
                    model,
                    delta,
                    piece.finish_reason,
                    piece.stop_reason,
                    piece.logprobs,
                    running_usage(piece),
                )
                if piece.disaggregated is not None:
                    body["disaggregated_params"] = piece.disaggregated
                yield responses.sse(body)
            piece = await anext(pieces, None)
        if request.include_usage and last is not None:
            final = responses.usage(
                prompt_tokens, last.completion_tokens, last.cached_tokens, last.reasoning_tokens
            )
            yield responses.sse(responses.usage_chunk(rid, created, model, final))
        yield responses.DONE
    except EngineDeadError as exc:
        yield responses.sse(
            {
                "error": error_detail(
                    f"The engine failed while generating: {exc}", 500, "engine_error"
                )
            }
        )
    except RequestTimeoutError:
        yield responses.sse({"error": timeout_error().detail})
    except Exception as exc:  # noqa: BLE001 - headers are sent: an event is all that is left
        logger.exception("stream %s failed", rid)
        yield responses.sse(
            {"error": error_detail(f"Internal error: {type(exc).__name__}", 500, "internal")}
        )
    finally:
        await pieces.aclose()


async def cancel_on_disconnect(http_request: Any, task: asyncio.Task | None) -> None:
    # A non-streaming request never fails a send() when its client leaves; poll
    # for the disconnect and cancel the handler, which aborts the engine request.
    while True:
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if await http_request.is_disconnected():
            if task is not None:
                task.cancel()
            return
