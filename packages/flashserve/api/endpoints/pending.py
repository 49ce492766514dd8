"""Routes Truss serves whose endpoint is not built yet: a clear 501, not Truss's 404."""

from __future__ import annotations

from starlette.responses import JSONResponse

from flashserve.api.http.errors import error_body


def not_yet_implemented(route: str) -> JSONResponse:
    return JSONResponse(
        error_body(
            f"{route} is not implemented yet on this server; use /v1/chat/completions.",
            "not_implemented_error",
            code="not_implemented",
        ),
        status_code=501,
    )
