"""What every endpoint does the same way around its own protocol.

An endpoint subclasses `Endpoint` and supplies three things: `prepare` (its request
body -> a prepared request holding a GenerationRequest, through the model's frontend),
`respond` (the pieces -> its JSON body or event stream) and, if its API shapes errors
differently from OpenAI, `error_response`. Body parsing, deadlines, refusals, metrics
of refused requests and the engine's failures are handled here for all of them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import HTTPException
from starlette.responses import Response

from flashserve.api.endpoints.request_schema import default_max_bytes
from flashserve.api.frontend.generation import GenerationRequest
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.http.body import parse_json_body
from flashserve.api.http.errors import RequestError, error_response, http_error, timeout_error
from flashserve.api.http.sse import cancel_on_disconnect
from flashserve.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    RequestTimeoutError,
)
from flashserve.metrics import REQUESTS

logger = logging.getLogger("flashserve.requests")

# Per-request deadline in seconds; config `request_timeout_s` caps it (docs/operations.md).
TIMEOUT_HEADER = "x-request-timeout"
REQUEST_ID_HEADER = "x-baseten-request-id"
# Client-chosen strings that reach the log are clipped: a log line must stay a line.
LOG_FIELD_CHARS = 128


class Prepared(Protocol):
    """An endpoint's request, ready to generate: whatever it keeps, plus this."""

    generation: GenerationRequest


class Endpoint:
    """The HTTP side shared by all endpoints; see the module docstring for the hooks."""

    def __init__(self, frontend: ModelFrontend, max_bytes: int | None = None) -> None:
        self.frontend = frontend
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    # -- hooks --------------------------------------------------------------

    def prepare(self, body: Any, http_request: Any = None) -> Prepared:
        """Validate the body and build its GenerationRequest. Runs off the event loop."""
        raise NotImplementedError

    async def respond(
        self,
        prepared: Prepared,
        first: Piece | None,
        pieces: AsyncIterator[Piece],
        http_request: Any,
    ) -> dict | Response:
        """The response: a JSON body (collect_pieces gathers them) or an event stream."""
        raise NotImplementedError

    def generate(self, prepared: Prepared) -> AsyncIterator[Any]:
        """The request's output: the pieces of its one generation. An endpoint that runs
        several at once (completions' list of prompts) merges them here."""
        return self.frontend.generate(prepared.generation)

    def uses_own_template(self, body: Any) -> bool:
        """Whether preparing `body` renders a template the request brought (jailed, slow)."""
        return False

    def error_response(self, status: int, detail: dict, headers: dict | None) -> Response:
        """A refusal as this API shapes errors; `detail` is OpenAI's inner error object."""
        return error_response(status, detail, headers)

    # -- the request's path ----------------------------------------------------

    async def handle(self, http_request: Any) -> dict | Response:
        """The HTTP entry point (model.py): raw body in, a body or a response out.

        Truss's own body parsing answers invalid UTF-8 or deep nesting with a 500, and
        its error handler drops the headers of a raised HTTPException (Retry-After);
        so the body is parsed here and every refusal is returned as a response.
        """
        started = time.monotonic()
        try:
            body = parse_json_body(await http_request.body(), self.max_bytes)
            return await self.create(body, http_request, started=started)
        except RequestError as exc:  # the body itself: create() counts and logs the rest
            REQUESTS.labels("rejected").inc()
            _log_rejected(exc, http_request)
            return self.error_response(exc.status, exc.to_body()["error"], exc.headers)
        except HTTPException as exc:
            return self.error_response(exc.status_code, exc.detail, exc.headers)

    async def create(
        self, body: Any, http_request: Any = None, started: float | None = None
    ) -> dict | Response:
        """A parsed body -> the response; a refusal raises HTTPException."""
        frontend = self.frontend
        try:
            deadline = self.deadline(http_request, started or time.monotonic())
            prepared = await frontend.off_loop(
                functools.partial(self.prepare, body, http_request),
                own_template=self.uses_own_template(body),
            )
            prepared.generation.deadline = deadline
        except RequestError as exc:
            REQUESTS.labels("rejected").inc()
            _log_rejected(exc, http_request)
            raise HTTPException(
                status_code=exc.status, detail=exc.to_body()["error"], headers=exc.headers or None
            ) from exc
        if frontend.engine.error is not None:
            raise http_error(
                503, "The engine has failed; this replica is restarting.", "engine_dead"
            )
        pieces = self.generate(prepared)
        first = await first_or_error(pieces)
        return await self.respond(prepared, first, pieces, http_request)

    def request_id(self, prefix: str, http_request: Any) -> str:
        """`prefix` + Baseten's request id when the call has one, else a fresh one."""
        header_id = (
            http_request.headers.get(REQUEST_ID_HEADER) if http_request is not None else None
        )
        return f"{prefix}{header_id or uuid.uuid4().hex}"

    def log_model_name(self, requested: str) -> None:
        """Log a request that names another model than the served one (it is served anyway)."""
        served = self.frontend.served_model_name
        if requested != served:
            logger.info("request names model %r; serving %r", requested[:LOG_FIELD_CHARS], served)

    def deadline(self, http_request: Any, started: float) -> float | None:
        """time.monotonic() at which the request is aborted: the header, capped by config."""
        limit = self.frontend.request_timeout_s
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


async def first_or_error(pieces: AsyncIterator[Piece]) -> Piece | None:
    """Pull the first piece before answering, so overload and bad input still get a status code."""
    try:
        return await anext(pieces, None)
    except EngineOverloadedError as exc:
        await pieces.aclose()
        raise http_error(
            503,
            f"The server is overloaded: {exc}. Retry shortly.",
            "overloaded",
            {"Retry-After": "1"},
        ) from exc
    except EngineDeadError as exc:
        await pieces.aclose()
        raise http_error(503, f"The engine has failed: {exc}", "engine_dead") from exc
    except RequestTimeoutError as exc:
        await pieces.aclose()
        raise timeout_error() from exc
    except ValueError as exc:
        await pieces.aclose()
        raise http_error(400, str(exc), "invalid_request") from exc


async def collect_pieces(
    first: Piece | None, pieces: AsyncIterator[Piece], http_request: Any
) -> list[Piece]:
    """All of a request's pieces, for a non-streamed body; a client that leaves meanwhile
    cancels the handler (and with it the engine request)."""
    collected: list[Piece] = []
    watcher = None
    if http_request is not None:
        watcher = asyncio.create_task(cancel_on_disconnect(http_request, asyncio.current_task()))
    try:
        piece = first
        while piece is not None:
            collected.append(piece)
            piece = await anext(pieces, None)
    except EngineDeadError as exc:
        raise http_error(500, f"The engine failed while generating: {exc}", "engine_error") from exc
    except RequestTimeoutError as exc:
        raise timeout_error() from exc
    except asyncio.CancelledError:
        # The watcher ends only by cancelling this handler, once the client has left.
        if watcher is None or not watcher.done() or watcher.cancelled():
            raise
        # End it with a status nobody reads rather than an error the ASGI server logs
        # as a crash (Task.uncancel: Python 3.11+; 3.10 keeps no cancel count).
        uncancel = getattr(asyncio.current_task(), "uncancel", None)
        if uncancel is not None:
            uncancel()
        raise http_error(499, "The client closed the request.", "client_closed") from None
    finally:
        if watcher is not None:
            watcher.cancel()
        await pieces.aclose()
    return collected


def _log_rejected(exc: RequestError, http_request: Any) -> None:
    # The field and reason only: messages may quote request values (prompt text).
    header_id = http_request.headers.get(REQUEST_ID_HEADER) if http_request is not None else None
    logger.info(
        "request rejected",
        extra={
            "request_id": header_id,
            "status": exc.status,
            "code": exc.code,
            "param": (exc.param or "")[:LOG_FIELD_CHARS] or None,
        },
    )
