"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` plus an HTTP status.

The one table from HTTP status to error `type`, for refusals raised while a request is
prepared (RequestError) and for engine failures answered as HTTP errors alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from starlette.responses import JSONResponse

# OpenAI-style `type` names for the statuses this server answers with; clients
# switch on `type`, so keep these stable.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def default_error_type(status: int) -> str:
    """The OpenAI-style error `type` for an HTTP status."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "internal_server_error"


def error_body(
    message: str, err_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error response (also the payload of a failed stream's last event)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_detail(message: str, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """The inner object of an error body, its `type` from the status."""
    return error_body(message, default_error_type(status), param, code)["error"]


def error_response(status: int, detail: Any, headers: dict | None) -> JSONResponse:
    # OpenAI's error shape, with the headers a raised HTTPException would lose in Truss.
    return JSONResponse({"error": detail}, status_code=status, headers=headers or None)


def http_error(status: int, message: str, code: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(
        status_code=status, detail=error_detail(message, status, code), headers=headers
    )


def timeout_error() -> HTTPException:
    return http_error(
        504, "The request passed its deadline (x-request-timeout or request_timeout_s)", "timeout"
    )


class RequestError(Exception):
    """A request the server refuses, carrying everything needed to answer it.

    `param` names the offending request field (`messages[0].role`), `code` is a
    machine-readable reason, `headers` are extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.err_type = err_type or default_error_type(status)
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.param, self.code)

    def __repr__(self) -> str:
        return (
            f"RequestError({self.message!r}, param={self.param!r}, code={self.code!r}, "
            f"status={self.status})"
        )
