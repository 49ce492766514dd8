"""Engine and deadline failures as OpenAI-shaped HTTP errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import HTTPException
from starlette.responses import JSONResponse

from flashserve.api.pieces import Piece
from flashserve.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    RequestTimeoutError,
)


def error_detail(message: str, status: int, code: str) -> dict:
    kinds = {
        400: "invalid_request_error",
        500: "internal_server_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }
    return {"message": message, "type": kinds.get(status, "error"), "param": None, "code": code}


def timeout_error() -> HTTPException:
    return http_error(
        504, "The request passed its deadline (x-request-timeout or request_timeout_s)", "timeout"
    )


def error_response(status: int, detail: Any, headers: dict | None) -> JSONResponse:
    # OpenAI's error shape, with the headers a raised HTTPException would lose in Truss.
    return JSONResponse({"error": detail}, status_code=status, headers=headers or None)


def http_error(status: int, message: str, code: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(
        status_code=status, detail=error_detail(message, status, code), headers=headers
    )


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
