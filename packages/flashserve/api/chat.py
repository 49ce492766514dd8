"""The chat-completions endpoint: request in, JSON body or SSE stream out."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from flashserve.api import responses
from flashserve.api.body import parse_json_body
from flashserve.api.detokenizer import IncrementalDetokenizer
from flashserve.api.disaggregated import handle_body, unknown_context_error
from flashserve.api.errors import RequestError
from flashserve.api.output_formats import OutputFormats, ParsingPlan
from flashserve.api.prompt import echo_prefix, encode_prompt, render_prompt
from flashserve.api.protocol import ChatRequest
from flashserve.api.sampling import ModelDefaults, to_sampling_params
from flashserve.api.schema import RequestValidator
from flashserve.api.stop import StopStringMatcher
from flashserve.api.structured_output import StructuredOutputs
from flashserve.api.template_jail import render_isolated
from flashserve.api.token_text import TokenText
from flashserve.api.tool_grammar import ToolGrammars
from flashserve.api.tools import NONE, ToolPlan
from flashserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestTimeoutError,
)
from flashserve.engine.sampling_params import SamplingParams
from flashserve.metrics import (
    GENERATED_TOKENS,
    ITL,
    PROMPT_TOKENS,
    REQUEST_SECONDS,
    REQUESTS,
    TTFT,
)

logger = logging.getLogger("flashserve.requests")

DISCONNECT_POLL_SECONDS = 0.25
# Per-request deadline in seconds; config `request_timeout_s` caps it (docs/operations.md).
TIMEOUT_HEADER = "x-request-timeout"
# Client-chosen strings that reach the log are clipped: a log line must stay a line.
LOG_FIELD_CHARS = 128


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
    # context_only: the response's top-level `disaggregated_params` (the handle).
    disaggregated: dict | None = None
    # Thinking text (reasoning_content) and tool-call deltas read from this step's text.
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    reasoning_tokens: int = 0


@dataclass
class PreparedRequest:
    request: ChatRequest
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))
    # `echo`: the continued assistant message, which opens the response content.
    echo: str = ""
    # time.monotonic() past which the request is aborted (None: no deadline).
    deadline: float | None = None
    # What the request lets the model do with tools, and how its output is parsed.
    tools: ToolPlan = field(default_factory=lambda: ToolPlan(NONE))
    parsing: ParsingPlan = field(default_factory=ParsingPlan)


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
        self.structured = StructuredOutputs(tokenizer, self.vocab_size, engine.engine.eos_token_ids)
        config = engine.engine.config
        self.formats = OutputFormats(tokenizer, config.tool_call_parser, config.reasoning_parser)
        self.tool_grammars = ToolGrammars(tokenizer, self.structured)
        self.request_timeout_s = getattr(engine.engine.config, "request_timeout_s", None)
        # No token spans more characters than the longest vocabulary entry, so a prompt
        # longer than this cannot fit the context: refused before tokenizing (which
        # costs about a second per megabyte).
        self.max_prompt_chars = self.max_model_len * _max_token_chars(tokenizer)
        # Requests with their own chat template wait up to seconds on a jailed render;
        # they get threads of their own so they can never occupy the shared pool.
        self._template_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="template")

    # -- entry point -------------------------------------------------------

    async def handle(self, http_request: Any) -> dict | Response:
        """The HTTP entry point (model.py): raw body in, a body or a response out.

        Truss's own body parsing answers invalid UTF-8 or deep nesting with a 500, and
        its error handler drops the headers of a raised HTTPException (Retry-After);
        so the body is parsed here and every refusal is returned as a JSONResponse.
        """
        started = time.monotonic()
        try:
            body = parse_json_body(await http_request.body(), self.validator.max_bytes)
            return await self.create(body, http_request, started=started)
        except RequestError as exc:  # the body itself: create() counts and logs the rest
            REQUESTS.labels("rejected").inc()
            _log_rejected(exc, http_request)
            return _error_response(exc.status, exc.to_body()["error"], exc.headers)
        except HTTPException as exc:
            return _error_response(exc.status_code, exc.detail, exc.headers)

    async def create(
        self, body: Any, http_request: Any = None, started: float | None = None
    ) -> dict | StreamingResponse:
        try:
            deadline = self._deadline(http_request, started or time.monotonic())
            # Off the event loop: validating, rendering and tokenizing a large body takes
            # a while, and the streams of other requests must keep flowing meanwhile.
            prepared = await self._prepare_off_loop(body, http_request)
            prepared.deadline = deadline
            # Compiled on a worker thread before submitting: slow schemas stall nobody, and
            # an invalid one is a 400 before any token is generated.
            await self.structured.attach(prepared.request.response_format, prepared.params)
            if prepared.tools.constrained:  # tool_choice required or named: forced calls
                parsing = prepared.parsing
                await self.tool_grammars.attach(
                    prepared.params,
                    parsing.tool_parser,
                    prepared.tools,
                    parsing.thinking,
                    parsing.keep_special_ids,
                )
        except RequestError as exc:
            REQUESTS.labels("rejected").inc()
            _log_rejected(exc, http_request)
            raise HTTPException(
                status_code=exc.status, detail=exc.to_body()["error"], headers=exc.headers or None
            ) from exc
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
        body = self.validator.validate(body)
        request = ChatRequest.model_validate(body)
        if request.model != self.served_model_name:
            logger.info(
                "request names model %r; serving %r",
                request.model[:LOG_FIELD_CHARS],
                self.served_model_name,
            )
        text = self._render(request)
        if not request.truncate_prompt_tokens and len(text) > self.max_prompt_chars:
            raise RequestError(
                f"The prompt is {len(text)} characters long, more than this model's "
                f"{self.max_model_len}-token context can hold. Shorten the messages or set "
                "truncate_prompt_tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        prompt_ids = encode_prompt(self.tokenizer, text, request.add_special_tokens)
        if request.truncate_prompt_tokens and len(prompt_ids) > request.truncate_prompt_tokens:
            prompt_ids = prompt_ids[-request.truncate_prompt_tokens :]
        params = to_sampling_params(
            request,
            self.defaults,
            prompt_len=len(prompt_ids),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            tokenizer=self.tokenizer,
        )
        tools, parsing = self.formats.prepare(request, text, params)
        handle = params.disaggregated.handle if params.disaggregated else None
        if handle is not None and not self.engine.engine.contexts.contains(handle):
            raise unknown_context_error(handle)
        header_id = (
            http_request.headers.get("x-baseten-request-id") if http_request is not None else None
        )
        request_id = f"chatcmpl-{header_id or uuid.uuid4().hex}"
        return PreparedRequest(
            request=request,
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            echo=echo_prefix(request) or "",
            tools=tools,
            parsing=parsing,
        )

    async def _prepare_off_loop(self, body: Any, http_request: Any) -> PreparedRequest:
        own_template = isinstance(body, dict) and bool(body.get("chat_template"))
        pool = self._template_pool if own_template else None  # None: asyncio's default pool
        call = functools.partial(self.prepare, body, http_request)
        context = contextvars.copy_context()  # Truss's request-id log context, as to_thread does
        return await asyncio.get_running_loop().run_in_executor(pool, context.run, call)

    def _render(self, request: ChatRequest) -> str:
        if not request.chat_template:
            return render_prompt(self.tokenizer, request)
        # The request's own template: rendered in a forked child under CPU, memory and
        # time limits, since a template can loop or allocate without bound.
        return render_isolated(
            lambda: render_prompt(self.tokenizer, request), max_chars=self.max_prompt_chars
        )

    def _deadline(self, http_request: Any, started: float) -> float | None:
        """time.monotonic() at which the request is aborted: the header, capped by config."""
        limit = self.request_timeout_s
        raw = http_request.headers.get(TIMEOUT_HEADER) if http_request is not None else None
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                asked = float("nan")
            if not 0 < asked < float("inf"):
                raise RequestError(
                    f"The {TIMEOUT_HEADER} header must be a positive number of seconds, "
                    f"got {raw[:32]!r}",
                    code="invalid_timeout",
                )
            limit = asked if limit is None else min(asked, limit)
        return None if limit is None else started + limit

    # -- generation -----------------------------------------------------------

    async def _generate(self, prepared: PreparedRequest) -> AsyncIterator[Piece]:
        """Engine outputs -> text pieces, with stop strings applied; aborts the engine on early exit."""
        request = prepared.request
        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids=prepared.prompt_ids,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            keep_special_ids=prepared.parsing.keep_special_ids,
        )
        # Splits reasoning and tool calls off the text (passes it through when neither).
        parser = prepared.parsing.new_parser()
        stops = StopStringMatcher(request.stop_strings, request.include_stop_str_in_output)
        started = time.monotonic()
        first_token_at = None
        last_token_at = started
        PROMPT_TOKENS.inc(len(prepared.prompt_ids))
        completion_tokens = 0
        finish_reason = None
        # How a request that did not finish ended; "aborted" means its consumer left.
        outcome = "aborted"
        outputs = self.engine.generate(
            prepared.request_id, prepared.prompt_ids, prepared.params, deadline=prepared.deadline
        )
        try:
            async for out in outputs:
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = now
                    TTFT.observe(now - started)
                else:
                    ITL.observe(now - last_token_at)
                last_token_at = now
                GENERATED_TOKENS.inc(len(out.new_token_ids))
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
                    # A stop that could only be confirmed at the end still counts.
                    matched = stops.matched
                parsed = parser.feed(emitted, len(ids))
                if matched is not None or out.finished or parser.exhausted:
                    parsed.extend(parser.finish())
                piece = Piece(
                    text=parsed.content,
                    logprobs=self._logprob_entries(out, request),
                    prompt_tokens=out.num_prompt_tokens,
                    cached_tokens=out.num_cached_tokens,
                    completion_tokens=completion_tokens,
                    reasoning=parsed.reasoning,
                    tool_calls=parsed.tool_calls,
                    reasoning_tokens=parser.reasoning_tokens,
                )
                if out.context_handle is not None:
                    piece.disaggregated = handle_body(out.context_handle, out.new_token_ids)
                if matched is not None:
                    piece.finish_reason, piece.stop_reason = "stop", matched
                elif out.finished:
                    piece.finish_reason, piece.stop_reason = out.finish_reason, out.stop_reason
                elif parser.exhausted:
                    # parallel_tool_calls false (or a named function): the one call is
                    # complete, so generation stops here; leaving the loop aborts it.
                    piece.finish_reason = "tool_calls"
                if piece.finish_reason == "stop" and parser.called_tools:
                    piece.finish_reason = "tool_calls"
                finish_reason = piece.finish_reason
                yield piece
                if piece.finish_reason is not None:
                    return
        except EngineOverloadedError:
            outcome = "overloaded"
            raise
        except RequestTimeoutError:
            outcome = "timeout"
            raise
        except EngineDeadError:
            outcome = "engine_error"
            raise
        except ValueError:  # the engine refused the request (a 400)
            outcome = "rejected"
            raise
        finally:
            await outputs.aclose()  # aborts the engine request if it is still running
            REQUESTS.labels(finish_reason or outcome).inc()
            REQUEST_SECONDS.observe(time.monotonic() - started)
            self._log(
                prepared, started, first_token_at, completion_tokens, finish_reason or outcome
            )

    def _logprob_entries(self, out, request: ChatRequest) -> list[dict] | None:
        if not request.logprobs or not out.logprobs:
            return None
        return [
            # The engine may hold more alternatives than asked (context_only keeps 20).
            self.token_text.entry(
                lp.token_id,
                lp.logprob,
                lp.top[: request.top_logprobs],
                with_top=request.top_logprobs > 0,
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
        thoughts: list[str] = []
        tool_calls: list[dict] = []
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
                thoughts.append(piece.reasoning)
                tool_calls.extend(piece.tool_calls)
                if logprobs is not None and piece.logprobs:
                    logprobs.extend(piece.logprobs)
                last = piece
                piece = await anext(pieces, None)
        except EngineDeadError as exc:
            raise _http_error(
                500, f"The engine failed while generating: {exc}", "engine_error"
            ) from exc
        except RequestTimeoutError as exc:
            raise _timeout_error() from exc
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
            self.served_model_name,
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
                    "error": _error_detail(
                        f"The engine failed while generating: {exc}", 500, "engine_error"
                    )
                }
            )
        except RequestTimeoutError:
            yield responses.sse({"error": _timeout_error().detail})
        except Exception as exc:  # noqa: BLE001 - headers are sent: an event is all that is left
            logger.exception("stream %s failed", rid)
            yield responses.sse(
                {"error": _error_detail(f"Internal error: {type(exc).__name__}", 500, "internal")}
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
                "user": (prepared.request.user or "")[:LOG_FIELD_CHARS] or None,
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
    except RequestTimeoutError as exc:
        await pieces.aclose()
        raise _timeout_error() from exc
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
        504: "timeout_error",
    }
    return {"message": message, "type": kinds.get(status, "error"), "param": None, "code": code}


def _timeout_error() -> HTTPException:
    return _http_error(
        504, "The request passed its deadline (x-request-timeout or request_timeout_s)", "timeout"
    )


def _error_response(status: int, detail: Any, headers: dict | None) -> JSONResponse:
    # OpenAI's error shape, with the headers a raised HTTPException would lose in Truss.
    return JSONResponse({"error": detail}, status_code=status, headers=headers or None)


def _log_rejected(exc: RequestError, http_request: Any) -> None:
    # The field and reason only: messages may quote request values (prompt text).
    header_id = (
        http_request.headers.get("x-baseten-request-id") if http_request is not None else None
    )
    logger.info(
        "request rejected",
        extra={
            "request_id": header_id,
            "status": exc.status,
            "code": exc.code,
            "param": (exc.param or "")[:LOG_FIELD_CHARS] or None,
        },
    )


def _max_token_chars(tokenizer: Any) -> int:
    """Characters the longest token can decode to, doubled for normalizers; 64 if unknown."""
    try:
        longest = max(len(token) for token in tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without a plain vocabulary
        return 64
    # Byte-level BPE keys hold one character per byte and SentencePiece keys one per
    # character, so a key is never shorter than its text.
    return 2 * max(longest, 1)


def _http_error(status: int, message: str, code: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(
        status_code=status, detail=_error_detail(message, status, code), headers=headers
    )
