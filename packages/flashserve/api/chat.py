"""The chat-completions endpoint: request in, JSON body or SSE stream out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from starlette.responses import StreamingResponse

from flashserve.api import responses
from flashserve.api.detokenizer import IncrementalDetokenizer
from flashserve.api.errors import RequestError
from flashserve.api.prompt import encode_prompt, render_prompt
from flashserve.api.protocol import ChatRequest
from flashserve.api.sampling import ModelDefaults, to_sampling_params
from flashserve.api.schema import RequestValidator
from flashserve.api.stop import StopStringMatcher
from flashserve.api.token_text import TokenText
from flashserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from flashserve.engine.sampling_params import SamplingParams

logger = logging.getLogger("flashserve.requests")

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class Piece:
    """One step of a request's output, as text."""

    text: str
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class PreparedRequest:
    request: ChatRequest
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its generator, so a dropped client aborts at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class ChatService:
    def __init__(
        self,
        engine: AsyncEngine,
        tokenizer: Any,
        served_model_name: str,
        defaults: ModelDefaults,
        validator: RequestValidator | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.defaults = defaults
        self.validator = validator or RequestValidator()
        self.token_text = TokenText(tokenizer)
        self.max_model_len = engine.engine.max_model_len
        self.vocab_size = engine.engine.model_config.vocab_size

    # -- entry point -------------------------------------------------------

    async def create(self, body: Any, http_request: Any = None) -> dict | StreamingResponse:
        try:
            prepared = self.prepare(body, http_request)
        except RequestError as exc:
            raise HTTPException(status_code=exc.status, detail=exc.to_body()["error"]) from exc
        if self.engine.error is not None:
            raise _http_error(
                503, "The engine has failed; this replica is restarting.", "engine_dead"
            )
        pieces = self._generate(prepared)
        first = await _first_or_error(pieces)
        if prepared.request.stream:
            return EventStreamResponse(self._stream(prepared, first, pieces))
        return await self._collect(prepared, first, pieces, http_request)

    def prepare(self, body: Any, http_request: Any = None) -> PreparedRequest:
        self.validator.validate(body)
        request = ChatRequest.model_validate(body)
        if request.model != self.served_model_name:
            logger.info("request names model %r; serving %r", request.model, self.served_model_name)
        text = render_prompt(self.tokenizer, request)
        prompt_ids = encode_prompt(self.tokenizer, text, request.add_special_tokens)
        if request.truncate_prompt_tokens and len(prompt_ids) > request.truncate_prompt_tokens:
            prompt_ids = prompt_ids[-request.truncate_prompt_tokens :]
        params = to_sampling_params(
            request,
            self.defaults,
            prompt_len=len(prompt_ids),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
        )
        header_id = (
            http_request.headers.get("x-baseten-request-id") if http_request is not None else None
        )
        request_id = f"chatcmpl-{header_id or uuid.uuid4().hex}"
        return PreparedRequest(
            request=request, request_id=request_id, prompt_ids=prompt_ids, params=params
        )

    # -- generation -----------------------------------------------------------

    async def _generate(self, prepared: PreparedRequest) -> AsyncIterator[Piece]:
        """Engine outputs -> text pieces, with stop strings applied; aborts the engine on early exit."""
        request = prepared.request
        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids=prepared.prompt_ids,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
        )
        stops = StopStringMatcher(request.stop_strings, request.include_stop_str_in_output)
        started = time.monotonic()
        first_token_at = None
        completion_tokens = 0
        finish_reason = None
        outputs = self.engine.generate(prepared.request_id, prepared.prompt_ids, prepared.params)
        try:
            async for out in outputs:
                first_token_at = first_token_at or time.monotonic()
                completion_tokens += len(out.new_token_ids)
                ids = out.new_token_ids
                # A stop token (EOS or stop_token_ids) ends the text without being part of it.
                stopped_by_token = (
                    out.finish_reason == "stop" and not request.include_stop_str_in_output
                )
                text = detok.add_tokens(ids[:-1] if stopped_by_token else ids)
                if out.finished:
                    text += detok.flush()
                emitted, matched = stops.feed(text)
                if out.finished and matched is None:
                    emitted += stops.flush()
                piece = Piece(
                    text=emitted,
                    logprobs=self._logprob_entries(out, request),
                    prompt_tokens=out.num_prompt_tokens,
                    cached_tokens=out.num_cached_tokens,
                    completion_tokens=completion_tokens,
                )
                if matched is not None:
                    piece.finish_reason, piece.stop_reason = "stop", matched
                elif out.finished:
                    piece.finish_reason, piece.stop_reason = out.finish_reason, out.stop_reason
                finish_reason = piece.finish_reason
                yield piece
                if piece.finish_reason is not None:
                    return
        finally:
            await outputs.aclose()  # aborts the engine request if it is still running
            self._log(prepared, started, first_token_at, completion_tokens, finish_reason)

    def _logprob_entries(self, out, request: ChatRequest) -> list[dict] | None:
        if not request.logprobs or not out.logprobs:
            return None
        return [
            self.token_text.entry(
                lp.token_id, lp.logprob, lp.top, with_top=request.top_logprobs > 0
            )
            for lp in out.logprobs
        ]

    # -- response shapes --------------------------------------------------

    async def _collect(
        self,
        prepared: PreparedRequest,
        first: Piece | None,
        pieces: AsyncIterator[Piece],
        http_request: Any,
    ) -> dict:
        texts: list[str] = []
        logprobs: list[dict] | None = [] if prepared.request.logprobs else None
        last = Piece(text="")
        watcher = None
        if http_request is not None:
            watcher = asyncio.create_task(
                _cancel_on_disconnect(http_request, asyncio.current_task())
            )
        try:
            piece = first
            while piece is not None:
                texts.append(piece.text)
                if logprobs is not None and piece.logprobs:
                    logprobs.extend(piece.logprobs)
                last = piece
                piece = await anext(pieces, None)
        except EngineDeadError as exc:
            raise _http_error(
                500, f"The engine failed while generating: {exc}", "engine_error"
            ) from exc
        finally:
            if watcher is not None:
                watcher.cancel()
            await pieces.aclose()
        message = {"role": "assistant", "content": "".join(texts)}
        return responses.completion(
            prepared.request_id,
            prepared.created,
            self.served_model_name,
            message,
            last.finish_reason,
            last.stop_reason,
            responses.usage(
                last.prompt_tokens or len(prepared.prompt_ids),
                last.completion_tokens,
                last.cached_tokens,
            ),
            logprobs,
        )

    async def _stream(
        self, prepared: PreparedRequest, first: Piece | None, pieces: AsyncIterator[Piece]
    ):
        request = prepared.request
        rid, created, model = prepared.request_id, prepared.created, self.served_model_name
        prompt_tokens = len(prepared.prompt_ids)

        def running_usage(piece: Piece | None) -> dict | None:
            if not request.continuous_usage:
                return None
            done = piece.completion_tokens if piece else 0
            cached = piece.cached_tokens if piece else 0
            return responses.usage(prompt_tokens, done, cached)

        try:
            yield responses.sse(
                responses.chunk(
                    rid,
                    created,
                    model,
                    {"role": "assistant", "content": ""},
                    usage_body=running_usage(None),
                )
            )
            last = None
            piece = first
            while piece is not None:
                last = piece
                delta = {"content": piece.text} if piece.text else {}
                if delta or piece.logprobs or piece.finish_reason:
                    yield responses.sse(
                        responses.chunk(
                            rid,
                            created,
                            model,
                            delta,
                            piece.finish_reason,
                            piece.stop_reason,
                            piece.logprobs,
                            running_usage(piece),
                        )
                    )
                piece = await anext(pieces, None)
            if request.include_usage and last is not None:
                final = responses.usage(prompt_tokens, last.completion_tokens, last.cached_tokens)
                yield responses.sse(responses.usage_chunk(rid, created, model, final))
            yield responses.DONE
        except EngineDeadError as exc:
            yield responses.sse(
                {
                    "error": _error_detail(
                        f"The engine failed while generating: {exc}", 500, "engine_error"
                    )
                }
            )
        finally:
            await pieces.aclose()

    def _log(
        self,
        prepared: PreparedRequest,
        started: float,
        first_token_at: float | None,
        tokens: int,
        finish: str | None,
    ) -> None:
        now = time.monotonic()
        logger.info(
            "request done",
            extra={
                "request_id": prepared.request_id,
                "user": prepared.request.user,
                "prompt_tokens": len(prepared.prompt_ids),
                "completion_tokens": tokens,
                "ttft_ms": round((first_token_at - started) * 1000, 1) if first_token_at else None,
                "total_ms": round((now - started) * 1000, 1),
                "finish_reason": finish or "aborted",
            },
        )


async def _first_or_error(pieces: AsyncIterator[Piece]) -> Piece | None:
    """Pull the first piece before answering, so overload and bad input still get a status code."""
    try:
        return await anext(pieces, None)
    except EngineOverloadedError as exc:
        await pieces.aclose()
        raise _http_error(
            503,
            f"The server is overloaded: {exc}. Retry shortly.",
            "overloaded",
            {"Retry-After": "1"},
        ) from exc
    except EngineDeadError as exc:
        await pieces.aclose()
        raise _http_error(503, f"The engine has failed: {exc}", "engine_dead") from exc
    except ValueError as exc:
        await pieces.aclose()
        raise _http_error(400, str(exc), "invalid_request") from exc


async def _cancel_on_disconnect(http_request: Any, task: asyncio.Task | None) -> None:
    # A non-streaming request never fails a send() when its client leaves; poll
    # for the disconnect and cancel the handler, which aborts the engine request.
    while True:
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        if await http_request.is_disconnected():
            if task is not None:
                task.cancel()
            return


def _error_detail(message: str, status: int, code: str) -> dict:
    kinds = {
        400: "invalid_request_error",
        500: "internal_server_error",
        503: "service_unavailable_error",
    }
    return {"message": message, "type": kinds.get(status, "error"), "param": None, "code": code}


def _http_error(status: int, message: str, code: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(
        status_code=status, detail=_error_detail(message, status, code), headers=headers
    )
