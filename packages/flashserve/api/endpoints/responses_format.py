"""The Responses formatter: pieces of output -> output items, a `response` body and the
streaming events, in the order OpenAI documents them.

One `ResponseBuilder` makes both: the streamed events and the whole body come from the
same pass over the pieces, so a stream joined equals the body. Items open as their kind
of output starts (reasoning, a message, each function call) and close when another kind
starts or the response ends:

    response.created, response.in_progress,
    per item: response.output_item.added,
      reasoning: response.content_part.added, response.reasoning_text.delta ... .done,
                 response.content_part.done
      message:   response.content_part.added, response.output_text.delta ... .done,
                 response.content_part.done
      function_call: response.function_call_arguments.delta ... .done
    response.output_item.done,
    response.completed (or response.incomplete: cut by max_output_tokens; or
    response.failed: the engine failed mid-stream).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from flashserve.api.endpoints.base import collect_pieces
from flashserve.api.endpoints.responses_protocol import seal_reasoning
from flashserve.api.frontend.generation import GenerationRequest
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.http.sse import sse
from flashserve.engine.async_engine import EngineDeadError, RequestTimeoutError

logger = logging.getLogger("flashserve.requests")

COMPLETED, INCOMPLETE, IN_PROGRESS, FAILED = "completed", "incomplete", "in_progress", "failed"


@dataclass
class PreparedResponse:
    """A Responses request ready to generate, and what its response object repeats."""

    generation: GenerationRequest
    # The request's fields the response object echoes (model, instructions, tools, ...).
    echo: dict[str, Any]
    # The conversation so far as items (a stored predecessor's, then this input).
    items: list[dict[str, Any]]
    stream: bool = False
    store: bool = True
    logprobs: bool = False
    # include "reasoning.encrypted_content": reasoning items carry their text sealed.
    sealed_reasoning: bool = False


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(piece: Piece, prompt_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": piece.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": piece.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": piece.reasoning_tokens},
        "total_tokens": prompt_tokens + piece.completion_tokens,
    }


@dataclass
class _OpenItem:
    index: int
    item: dict[str, Any]
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)


class ResponseBuilder:
    """Pieces -> output items, with the events that announce them (numbered in order)."""

    def __init__(self, prepared: PreparedResponse) -> None:
        self.prepared = prepared
        self.response_id = prepared.generation.request_id
        self.output: list[dict[str, Any]] = []
        self.sequence = 0
        self._open: _OpenItem | None = None
        self._calls: dict[int, _OpenItem] = {}  # by the tool-call delta's index
        self._held_text = ""  # whitespace that may open a message, or end the response
        self._held_logprobs: list[dict] = []
        self.last: Piece | None = None

    # -- events ---------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response(IN_PROGRESS)
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, piece: Piece) -> list[dict[str, Any]]:
        self.last = piece
        events: list[dict[str, Any]] = []
        if piece.reasoning:
            events += self._reasoning(piece.reasoning)
        if piece.text:
            events += self._text(piece.text, piece.logprobs if self.prepared.logprobs else None)
        for delta in piece.tool_calls:
            events += self._call(delta)
        return events

    def finish(self) -> list[dict[str, Any]]:
        """Close the open item and end the response (completed or incomplete)."""
        status = COMPLETED
        if self.last is not None and self.last.finish_reason == "length":
            status = INCOMPLETE
        events: list[dict[str, Any]] = []
        if not self.output:
            # Nothing but whitespace (or nothing): still one message, as chat's content.
            events += self._open_message()
            if self._held_text:
                events += self._text_delta(self._held_text, self._held_logprobs)
        events += self._close(status)
        body = self.response(status)
        kind = "response.incomplete" if status == INCOMPLETE else "response.completed"
        return [*events, self._event(kind, response=body)]

    def fail(self, message: str) -> list[dict[str, Any]]:
        events = self._close(INCOMPLETE)
        body = self.response(FAILED)
        body["error"] = {"code": "server_error", "message": message}
        return [*events, self._event("response.failed", response=body)]

    # -- the response object ---------------------------------------------------

    def response(self, status: str) -> dict[str, Any]:
        generation = self.prepared.generation
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "response",
            "created_at": generation.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            **self.prepared.echo,
            "output": [dict(item) for item in self.output] if status != IN_PROGRESS else [],
            "usage": None,
        }
        if status == INCOMPLETE:
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if status in (COMPLETED, INCOMPLETE):
            body["completed_at"] = int(time.time())
            body["usage"] = usage(self.last or Piece(text=""), len(generation.prompt_ids))
        return body

    # -- items -----------------------------------------------------------------

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open.item["type"] != "reasoning":
            events += self._close(COMPLETED)
            item = {
                "id": item_id("rs"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": IN_PROGRESS,
            }
            events += self._add(item)
            part = {"type": "reasoning_text", "text": ""}
            events.append(self._part_event("response.content_part.added", part))
        opened = self._open
        assert opened is not None
        opened.text += text
        events.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=opened.item["id"],
                output_index=opened.index,
                content_index=0,
                delta=text,
            )
        )
        return events

    def _text(self, text: str, logprobs: list[dict] | None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open.item["type"] != "message":
            if not (self._held_text + text).strip():
                # Whitespace between calls, or after the last: no message of its own.
                self._held_text += text
                self._held_logprobs += logprobs or []
                return events
            text, self._held_text = self._held_text + text, ""
            logprobs = [*self._held_logprobs, *(logprobs or [])]
            self._held_logprobs = []
            events += self._open_message()
        return events + self._text_delta(text, logprobs or [])

    def _open_message(self) -> list[dict[str, Any]]:
        events = self._close(COMPLETED)
        item = {
            "id": item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": IN_PROGRESS,
            "content": [],
        }
        events += self._add(item)
        events.append(self._part_event("response.content_part.added", self._text_part("", [])))
        return events

    def _text_delta(self, text: str, logprobs: list[dict]) -> list[dict[str, Any]]:
        opened = self._open
        assert opened is not None
        opened.text += text
        opened.logprobs += logprobs
        return [
            self._event(
                "response.output_text.delta",
                item_id=opened.item["id"],
                output_index=opened.index,
                content_index=0,
                delta=text,
                logprobs=logprobs,
            )
        ]

    def _call(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        function = delta.get("function") or {}
        call = self._calls.get(delta["index"])
        if call is None:
            events += self._close(COMPLETED)
            item = {
                "id": item_id("fc"),
                "type": "function_call",
                "call_id": delta.get("id") or item_id("call"),
                "name": function.get("name") or "",
                "arguments": "",
                "status": IN_PROGRESS,
            }
            events += self._add(item)
            call = self._calls[delta["index"]] = self._open
            assert call is not None
        arguments = function.get("arguments") or ""
        if arguments:
            call.text += arguments
            if call is self._open:
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=call.item["id"],
                        output_index=call.index,
                        delta=arguments,
                    )
                )
            else:  # a late fragment of a call already closed (parsers do not send these)
                call.item["arguments"] = call.text
        return events

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self._open = _OpenItem(len(self.output), item)
        self.output.append(item)
        return [
            self._event(
                "response.output_item.added", output_index=self._open.index, item=dict(item)
            )
        ]

    def _close(self, status: str) -> list[dict[str, Any]]:
        opened, self._open = self._open, None
        if opened is None:
            return []
        item, where = opened.item, {"item_id": opened.item["id"], "output_index": opened.index}
        item["status"] = status
        events: list[dict[str, Any]] = []
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": opened.text}
            item["content"] = [part]
            if self.prepared.sealed_reasoning:
                item["encrypted_content"] = seal_reasoning(opened.text)
            events.append(
                self._event(
                    "response.reasoning_text.done", **where, content_index=0, text=opened.text
                )
            )
            events.append(
                self._event("response.content_part.done", **where, content_index=0, part=part)
            )
        elif item["type"] == "message":
            part = self._text_part(opened.text, opened.logprobs)
            item["content"] = [part]
            events.append(
                self._event(
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=opened.text,
                    logprobs=opened.logprobs,
                )
            )
            events.append(
                self._event("response.content_part.done", **where, content_index=0, part=part)
            )
        else:
            item["arguments"] = opened.text
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=opened.text,
                )
            )
        events.append(
            self._event("response.output_item.done", output_index=opened.index, item=dict(item))
        )
        return events

    def _part_event(self, kind: str, part: dict[str, Any]) -> dict[str, Any]:
        opened = self._open
        assert opened is not None
        return self._event(
            kind, item_id=opened.item["id"], output_index=opened.index, content_index=0, part=part
        )

    def _text_part(self, text: str, logprobs: list[dict]) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.prepared.logprobs:
            part["logprobs"] = list(logprobs)
        return part


async def collect_body(
    prepared: PreparedResponse,
    first: Piece | None,
    pieces: AsyncIterator[Piece],
    http_request: Any,
    keep: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The whole `response` object; `keep` stores it (for previous_response_id)."""
    builder = ResponseBuilder(prepared)
    for piece in await collect_pieces(first, pieces, http_request):
        builder.feed(piece)
    body = builder.finish()[-1]["response"]
    keep(body)
    return body


async def stream_events(
    prepared: PreparedResponse,
    first: Piece | None,
    pieces: AsyncIterator[Piece],
    keep: Callable[[dict[str, Any]], None],
) -> AsyncIterator[bytes]:
    builder = ResponseBuilder(prepared)

    def encoded(events: list[dict[str, Any]]) -> bytes:
        return b"".join(sse(event, event["type"]) for event in events)

    try:
        yield encoded(builder.start())
        piece = first
        while piece is not None:
            events = builder.feed(piece)
            if events:
                yield encoded(events)
            piece = await anext(pieces, None)
        events = builder.finish()
        keep(events[-1]["response"])
        yield encoded(events)
    except EngineDeadError as exc:
        yield encoded(builder.fail(f"The engine failed while generating: {exc}"))
    except RequestTimeoutError:
        yield encoded(
            builder.fail("The request passed its deadline (x-request-timeout or request_timeout_s)")
        )
    except Exception as exc:  # noqa: BLE001 - headers are sent: an event is all that is left
        logger.exception("stream %s failed", builder.response_id)
        yield encoded(builder.fail(f"Internal error: {type(exc).__name__}"))
    finally:
        await pieces.aclose()
