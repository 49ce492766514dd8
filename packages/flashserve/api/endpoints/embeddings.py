"""/v1/embeddings: this deployment serves a generative model, so every request is refused
with an error that says so (instead of Truss's message about the model class)."""

from __future__ import annotations

from starlette.responses import JSONResponse

from flashserve.api.http.errors import error_body

NOT_AN_EMBEDDING_MODEL = "model_not_embedding"


def embeddings_unsupported(served_model_name: str) -> JSONResponse:
    """A 404 naming the endpoint: no embeddings here, whatever the body."""
    return JSONResponse(
        error_body(
            f"/v1/embeddings is not served here: this deployment serves {served_model_name!r}, "
            "a generative model. Use /v1/chat/completions, or deploy an embedding model.",
            "not_found_error",
            code=NOT_AN_EMBEDDING_MODEL,
        ),
        status_code=404,
    )
