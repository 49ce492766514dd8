"""The Messages formatter: pieces of output -> Anthropic content blocks, as one `message`
body or as Anthropic's server-sent events.

`ContentBlocks` turns pieces into block events (content_block_start / _delta / _stop) and
keeps the blocks they build; the streamed response sends the events, the JSON body
carries the blocks, so both always hold the same content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from flashserve.api.endpoints.base import collect_pieces
from flashserve.api.endpoints.messages_protocol import MessagesRequest
from flashserve.api.frontend.generation import GenerationRequest
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.http.sse import sse
from flashserve.engine.async_engine import EngineDeadError, RequestTimeoutError

logger = logging.getLogger("flashserve.requests")

# Anthropic sends `ping` events to keep idle connections open; so do we, after this many
# seconds without output (a long prompt's prefill, a queue).
DEFAULT_PING_INTERVAL_S = 15.0

THINKING, TEXT, TOOL_USE = "thinking", "text", "tool_use"


@dataclass
class PreparedMessages:
    """A Messages request ready to generate."""

    request: MessagesRequest
    generation: GenerationRequest


def named_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event named after its payload's type, as Anthropic frames them."""
    return sse(payload, event=payload["type"])


def thinking_signature(thinking: str) -> str:
    """A thinking block's `signature`: the SHA-256 of its text. Anthropic's is an encrypted
    attestation; clients only carry it back, and this server does not check it."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


class ContentBlocks:
    """Builds one response's content blocks from its pieces, as events and as blocks."""

    def __init__(self, omit_thinking: bool = False) -> None:
        self.omit_thinking = omit_thinking
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None
        self._thinking = ""  # the open thinking block's text (for its signature)
        self._arguments: dict[int, str] = {}  # tool_use block index -> its JSON so far

    def add(self, piece: Piece) -> list[dict[str, Any]]:
        """The events that `piece` makes (empty when it carries no content)."""
        events: list[dict[str, Any]] = []
        if piece.reasoning:
            if self._open != THINKING:
                events += self._start({"type": THINKING, "thinking": "", "signature": ""})
            self._thinking += piece.reasoning
            if not self.omit_thinking:
                self.blocks[-1]["thinking"] += piece.reasoning
                events.append(self._delta({"type": "thinking_delta", "thinking": piece.reasoning}))
        if piece.text:
            if self._open != TEXT:
                events += self._start({"type": TEXT, "text": ""})
            self.blocks[-1]["text"] += piece.text
            events.append(self._delta({"type": "text_delta", "text": piece.text}))
        for call in piece.tool_calls:
            function = call.get("function", {})
            if "id" in call:  # a new call
                events += self._start(
                    {
                        "type": TOOL_USE,
                        "id": new_tool_use_id(),
                        "name": function["name"],
                        "input": {},
                    }
                )
                self._arguments[len(self.blocks) - 1] = ""
            arguments = function.get("arguments", "")
            if arguments and self._open == TOOL_USE:
                self._arguments[len(self.blocks) - 1] += arguments
                events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def close(self) -> list[dict[str, Any]]:
        """Events that end the open block, if any."""
        if self._open is None:
            return []
        index = len(self.blocks) - 1
        events = []
        if self._open == THINKING:
            signature = thinking_signature(self._thinking)
            self.blocks[index]["signature"] = signature
            events.append(self._delta({"type": "signature_delta", "signature": signature}))
            self._thinking = ""
        elif self._open == TOOL_USE:
            self.blocks[index]["input"] = _tool_input(self._arguments[index])
        self._open = None
        events.append({"type": "content_block_stop", "index": index})
        return events

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.blocks.append(block)
        self._open = block["type"]
        events.append(
            {
                "type": "content_block_start",
                "index": len(self.blocks) - 1,
                "content_block": dict(block),
            }
        )
        return events

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the `input` object; {} when they were cut off (max_tokens)."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def stop_reason(prepared: PreparedMessages, last: Piece | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for the piece that ended the response."""
    reason = last.finish_reason if last is not None else None
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        asked = prepared.request.chat.max_tokens or 0
        if prepared.generation.params.max_tokens < asked:
            return "model_context_window_exceeded", None  # the context left less room
        return "max_tokens", None
    matched = last.stop_reason if last is not None else None
    if reason == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    return "end_turn", None


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` excludes what was read from the (prefix) cache."""
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
        "output_tokens": output_tokens,
    }


def _usage_of(prepared: PreparedMessages, piece: Piece | None) -> dict[str, int]:
    prompt = len(prepared.generation.prompt_ids)
    if piece is None:
        return usage(prompt, 0, 0)
    return usage(prompt, min(piece.cached_tokens, prompt), piece.completion_tokens)


def message(
    prepared: PreparedMessages,
    model: str,
    content: list[dict[str, Any]],
    last: Piece | None,
    final: bool = True,
) -> dict[str, Any]:
    """The `message` object; not `final` (message_start): no stop reason yet."""
    reason, sequence = stop_reason(prepared, last) if final else (None, None)
    return {
        "id": prepared.generation.request_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage_of(prepared, last),
    }


async def collect_body(
    prepared: PreparedMessages,
    first: Piece | None,
    pieces: AsyncIterator[Piece],
    http_request: Any,
    model: str,
) -> dict[str, Any]:
    collected = await collect_pieces(first, pieces, http_request)
    blocks = ContentBlocks(prepared.request.omit_thinking)
    for piece in collected:
        blocks.add(piece)
    blocks.close()
    return message(prepared, model, blocks.blocks, collected[-1] if collected else None)


def error_event(err_type: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": err_type, "message": text}}


async def stream_events(
    prepared: PreparedMessages,
    first: Piece | None,
    pieces: AsyncIterator[Piece],
    model: str,
    ping_interval_s: float | None = DEFAULT_PING_INTERVAL_S,
) -> AsyncIterator[bytes]:
    """message_start, then each block's start / deltas / stop, message_delta (stop reason,
    usage) and message_stop; `ping` whenever ping_interval_s pass without output."""
    rid = prepared.generation.request_id
    blocks = ContentBlocks(prepared.request.omit_thinking)
    stream = _with_pings(first, pieces, ping_interval_s)
    try:
        start = message(prepared, model, [], first, final=False)
        start["usage"]["output_tokens"] = 0
        yield named_event({"type": "message_start", "message": start})
        last = None
        async for piece in stream:
            if piece is None:
                yield named_event({"type": "ping"})
                continue
            last = piece
            for event in blocks.add(piece):
                yield named_event(event)
        for event in blocks.close():
            yield named_event(event)
        reason, sequence = stop_reason(prepared, last)
        yield named_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": _usage_of(prepared, last),
            }
        )
        yield named_event({"type": "message_stop"})
    except EngineDeadError as exc:
        yield named_event(error_event("api_error", f"The engine failed while generating: {exc}"))
    except RequestTimeoutError:
        yield named_event(
            error_event(
                "timeout_error",
                "The request passed its deadline (x-request-timeout or request_timeout_s)",
            )
        )
    except Exception as exc:  # noqa: BLE001 - headers are sent: an event is all that is left
        logger.exception("stream %s failed", rid)
        yield named_event(error_event("api_error", f"Internal error: {type(exc).__name__}"))
    finally:
        await stream.aclose()  # first: it may be waiting on `pieces`
        await pieces.aclose()


async def _with_pings(
    first: Piece | None, pieces: AsyncIterator[Piece], interval_s: float | None
) -> AsyncIterator[Piece | None]:
    """The pieces, with None wherever interval_s passed without one (a ping is due)."""
    piece = first
    while piece is not None:
        yield piece
        if interval_s is None:
            piece = await anext(pieces, None)
            continue
        pending = asyncio.ensure_future(anext(pieces, None))
        try:
            while not (await asyncio.wait({pending}, timeout=interval_s))[0]:
                yield None
        finally:
            if not pending.done():
                # The client left while we waited: stop the pull (which aborts the engine
                # request) before the caller closes the iterator.
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
        piece = pending.result()
