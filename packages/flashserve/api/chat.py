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
from typing import Any

from fastapi import HTTPException
from starlette.responses import Response, StreamingResponse

from flashserve.api.body import parse_json_body
from flashserve.api.delivery import EventStreamResponse, collect_body, stream_events
from flashserve.api.detokenizer import IncrementalDetokenizer
from flashserve.api.disaggregated import handle_body, unknown_context_error
from flashserve.api.errors import RequestError
from flashserve.api.http_errors import error_response, first_or_error, http_error
from flashserve.api.output_formats import OutputFormats
from flashserve.api.pieces import Piece, PreparedRequest
from flashserve.api.prompt import echo_prefix, encode_prompt, render_prompt
from flashserve.api.protocol import ChatRequest
from flashserve.api.sampling import ModelDefaults, to_sampling_params
from flashserve.api.schema import RequestValidator
from flashserve.api.stop import StopStringMatcher
from flashserve.api.structured_output import StructuredOutputs
from flashserve.api.template_jail import render_isolated
from flashserve.api.token_text import TokenText
from flashserve.api.tool_grammar import ToolGrammars
from flashserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestTimeoutError,
)
from flashserve.metrics import (
    GENERATED_TOKENS,
    ITL,
    PROMPT_TOKENS,
    REQUEST_SECONDS,
    REQUESTS,
    TTFT,
)

logger = logging.getLogger("flashserve.requests")

# Per-request deadline in seconds; config `request_timeout_s` caps it (docs/operations.md).
TIMEOUT_HEADER = "x-request-timeout"
# Client-chosen strings that reach the log are clipped: a log line must stay a line.
LOG_FIELD_CHARS = 128


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
            return error_response(exc.status, exc.to_body()["error"], exc.headers)
        except HTTPException as exc:
            return error_response(exc.status_code, exc.detail, exc.headers)

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
            raise http_error(
                503, "The engine has failed; this replica is restarting.", "engine_dead"
            )
        pieces = self._generate(prepared)
        first = await first_or_error(pieces)
        if prepared.request.stream:
            return EventStreamResponse(
                stream_events(prepared, first, pieces, self.served_model_name)
            )
        return await collect_body(prepared, first, pieces, http_request, self.served_model_name)

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
                    # Outputs may carry several tokens (stream_interval, a late consumer):
                    # each token is one observation of the mean gap.
                    n = len(out.new_token_ids)
                    for _ in range(n):
                        ITL.observe((now - last_token_at) / n)
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
                if completion_tokens < request.min_tokens:
                    # "Minimum number of tokens to generate before stopping": a stop
                    # string counts from the min_tokens-th token on (vLLM's rule too).
                    emitted, matched = text, None
                else:
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
