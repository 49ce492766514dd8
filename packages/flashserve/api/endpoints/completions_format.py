"""Completions' formatter: choice pieces -> text_completion bodies and streamed chunks
(OpenAI's legacy shapes), with completions-style logprobs."""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from flashserve.api.endpoints.base import collect_pieces
from flashserve.api.endpoints.chat_format import DONE, stream_error_event, usage
from flashserve.api.endpoints.completions_choices import ChoicePiece
from flashserve.api.endpoints.completions_protocol import CompletionRequest
from flashserve.api.frontend.generation import GenerationRequest
from flashserve.api.http.sse import sse

OBJECT = "text_completion"


@dataclass
class PreparedCompletion:
    """A completions request ready to generate: one generation per prompt."""

    request: CompletionRequest
    request_id: str
    generations: list[GenerationRequest]
    # `echo`: each prompt's text, which opens its choice's text ("" without echo).
    echoes: list[str]

    @property
    def generation(self) -> GenerationRequest:
        """The first prompt's (the base endpoint sets its deadline; the others copy it)."""
        return self.generations[0]


@dataclass
class Choice:
    """What a choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    text_chars: int = 0  # including the echo: where the next token's text starts
    logprobs: dict[str, list] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    echo_chars: int = 0
    token_bytes: list[bytes] = field(default_factory=list)  # each generated token's bytes

    def add_text(self, text: str) -> None:
        self.text.append(text)
        self.text_chars += len(text)


def token_string(entry: dict[str, Any]) -> str:
    """A token as legacy logprobs name it: its text, or `bytes:\\x..` for bytes that are
    not whole UTF-8 characters on their own."""
    raw = bytes(entry["bytes"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def logprobs_block(entries: list[dict], text_start: int, text: str) -> dict[str, list]:
    """Legacy logprobs for one step's tokens, whose text (`text`) starts at `text_start`.

    Each token's `text_offset` is where its text begins in the choice's text: the step's
    start plus the text of the tokens before it in the step, never past the step's end
    (stop strings and stop tokens leave tokens without text).
    """
    block: dict[str, list] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    consumed = 0
    for entry in entries:
        token = token_string(entry)
        block["tokens"].append(token)
        block["token_logprobs"].append(entry["logprob"])
        # The most likely alternatives, and always the sampled token (so up to logprobs+1).
        top = {token_string(alt): alt["logprob"] for alt in entry["top_logprobs"]}
        top.setdefault(token, entry["logprob"])
        block["top_logprobs"].append(top)
        block["text_offset"].append(text_start + min(consumed, len(text)))
        consumed += len(bytes(entry["bytes"]).decode("utf-8", errors="ignore"))
    return block


def aligned_offsets(token_bytes: list[bytes], text: str, start: int) -> list[int]:
    """Where each token's text begins in the finished `text`, its first token's at `start`.

    Each token's text (its bytes, decoded with those before it, so that a character split
    over byte tokens counts once, at its last byte) is looked for at the cursor, as the
    detokenizer wrote it: as it is, without the leading space SentencePiece drops at a
    segment start, or after the space that separates a shown special token. A token whose
    text is not there (a skipped special token, an end token, the cut-off part of a stop
    string) takes the cursor without moving it. Per step offsets cannot do this: the
    detokenizer holds text back until later tokens settle it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, cursor = [], start
    for raw in token_bytes:
        offsets.append(cursor)
        piece = decoder.decode(raw)
        if not piece:
            continue
        if text.startswith(piece, cursor):
            cursor += len(piece)
        elif piece[0] == " " and text.startswith(piece[1:], cursor):
            cursor += len(piece) - 1
        elif text.startswith(" " + piece, cursor):
            offsets[-1] = cursor + 1
            cursor += 1 + len(piece)
    return offsets


def _extend(into: dict[str, list] | None, block: dict[str, list]) -> dict[str, list]:
    if into is None:
        return {key: list(values) for key, values in block.items()}
    for key, values in block.items():
        into[key].extend(values)
    return into


def choice_body(
    index: int,
    text: str,
    logprobs: dict[str, list] | None,
    finish_reason: str | None,
    stop_reason: int | str | None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def completion(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict | None = None,
) -> dict[str, Any]:
    """A text_completion body; streamed chunks have the same shape."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": OBJECT,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return body


class Choices:
    """Every choice's state, and the request's usage summed over them."""

    def __init__(self, prepared: PreparedCompletion) -> None:
        self.choices = [Choice(index) for index in range(len(prepared.generations))]
        self.prompt_tokens = sum(len(g.prompt_ids) for g in prepared.generations)
        self.with_logprobs = prepared.request.logprobs is not None
        for choice, echo in zip(self.choices, prepared.echoes):
            choice.add_text(echo)
            choice.echo_chars = len(echo)

    def add(self, item: ChoicePiece) -> dict[str, Any] | None:
        """Record a piece; its chunk's choice body, or None when it carries nothing."""
        choice, piece = self.choices[item.index], item.piece
        block = None
        if self.with_logprobs and piece.logprobs:
            block = logprobs_block(piece.logprobs, choice.text_chars, piece.text)
            choice.logprobs = _extend(choice.logprobs, block)
            choice.token_bytes.extend(bytes(entry["bytes"]) for entry in piece.logprobs)
        choice.add_text(piece.text)
        choice.completion_tokens = piece.completion_tokens
        choice.cached_tokens = piece.cached_tokens
        if piece.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = piece.finish_reason, piece.stop_reason
        if not (piece.text or block or piece.finish_reason):
            return None
        return choice_body(item.index, piece.text, block, piece.finish_reason, piece.stop_reason)

    def usage(self) -> dict:
        return usage(
            self.prompt_tokens,
            sum(c.completion_tokens for c in self.choices),
            sum(c.cached_tokens for c in self.choices),
        )


async def collect_body(
    prepared: PreparedCompletion,
    first: ChoicePiece | None,
    pieces: AsyncIterator[ChoicePiece],
    http_request: Any,
    model: str,
) -> dict:
    state = Choices(prepared)
    for item in await collect_pieces(first, pieces, http_request):
        state.add(item)
    for choice in state.choices:
        if choice.logprobs is not None:
            # The whole text is known now: each token's own place in it (a stream can
            # only say where the text stood when the token came).
            text = "".join(choice.text)
            choice.logprobs["text_offset"] = aligned_offsets(
                choice.token_bytes, text, choice.echo_chars
            )
    choices = [
        choice_body(
            c.index,
            "".join(c.text),
            (c.logprobs or logprobs_block([], 0, "")) if state.with_logprobs else None,
            c.finish_reason,
            c.stop_reason,
        )
        for c in state.choices
    ]
    return completion(
        prepared.request_id, prepared.generation.created, model, choices, state.usage()
    )


async def stream_events(
    prepared: PreparedCompletion,
    first: ChoicePiece | None,
    pieces: AsyncIterator[ChoicePiece],
    model: str,
) -> AsyncIterator[bytes]:
    options = prepared.request.options
    rid, created = prepared.request_id, prepared.generation.created
    state = Choices(prepared)

    def event(choices: list[dict[str, Any]]) -> bytes:
        running = state.usage() if options.continuous_usage else None
        return sse(completion(rid, created, model, choices, running))

    try:
        for index, echo in enumerate(prepared.echoes):
            if echo:
                yield event([choice_body(index, echo, None, None, None)])
        item = first
        while item is not None:
            body = state.add(item)
            if body is not None:
                yield event([body])
            item = await anext(pieces, None)
        if options.include_usage:
            yield sse(completion(rid, created, model, [], state.usage()))
        yield DONE
    except Exception as exc:  # noqa: BLE001 - headers are sent: an event is all that is left
        yield stream_error_event(exc, rid)
    finally:
        await pieces.aclose()
