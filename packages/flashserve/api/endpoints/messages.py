"""/v1/messages, the Anthropic Messages API: a Messages request -> chat's prompt -> the
shared generation path -> Anthropic's content blocks and events.

Only what is Anthropic's own lives here and in messages_protocol / messages_format:
the request's shape and rules, its mapping onto the chat template's conversation,
content blocks, stop reasons, usage, its event stream and its error bodies.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response

from flashserve.api.endpoints.base import Endpoint
from flashserve.api.endpoints.messages_format import (
    DEFAULT_PING_INTERVAL_S,
    PreparedMessages,
    collect_body,
    stream_events,
)
from flashserve.api.endpoints.messages_protocol import MessagesValidator, rename_fields
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.http.errors import RequestError
from flashserve.api.http.sse import EventStreamResponse

# Anthropic's error `type` for each status it documents.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Anthropic answers "overloaded" with 529 (its SDK raises OverloadedError and retries).
OVERLOADED_STATUS = 529
OVERLOADED_CODE = "overloaded"

# What the shared path's refusals call things -> this API's fields.
_SHARED_FIELDS = (
    (re.compile(r"response_format\.json_schema\.schema"), "output_config.format.schema"),
    (re.compile(r"response_format 'json_schema'"), "output_config.format"),
    (re.compile(r"response_format"), "output_config.format"),
    (re.compile(r"tool_choice 'required'"), 'tool_choice {"type": "any"}'),
    (re.compile(r"tool_choice function ('[^']*')"), r'tool_choice {"type": "tool"} naming \1'),
    (re.compile(r" or set truncate_prompt_tokens"), ""),
)


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error(status: int, detail: Any, headers: dict | None = None) -> JSONResponse:
    """A refusal in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    message = detail.get("message") if isinstance(detail, dict) else str(detail)
    if isinstance(detail, dict) and detail.get("code") == OVERLOADED_CODE:
        status = OVERLOADED_STATUS
    return JSONResponse(
        {"type": "error", "error": {"type": error_type(status), "message": message}},
        status_code=status,
        headers=headers or None,
    )


class MessagesEndpoint(Endpoint):
    def __init__(
        self,
        frontend: ModelFrontend,
        validator: MessagesValidator | None = None,
        ping_interval_s: float | None = DEFAULT_PING_INTERVAL_S,
    ) -> None:
        self.validator = validator or MessagesValidator()
        self.ping_interval_s = ping_interval_s
        super().__init__(frontend, self.validator.max_bytes)

    def prepare(self, body: Any, http_request: Any = None) -> PreparedMessages:
        frontend = self.frontend
        request = self.validator.parse(body)
        self.log_model_name(request.model)
        chat = request.chat
        try:
            text = render_prompt(frontend.tokenizer, chat)
            prompt_ids = frontend.tokenize(text, chat, param="messages")
            generation = frontend.build(
                chat,
                self.request_id("msg_", http_request),
                text,
                prompt_ids,
                thinking_budget=request.thinking_budget,
            )
        except RequestError as exc:
            raise rename_fields(exc, _SHARED_FIELDS) from exc
        return PreparedMessages(request=request, generation=generation)

    async def respond(
        self,
        prepared: PreparedMessages,
        first: Piece | None,
        pieces: AsyncIterator[Piece],
        http_request: Any,
    ) -> dict | Response:
        model = self.frontend.served_model_name
        if prepared.request.stream:
            return EventStreamResponse(
                stream_events(prepared, first, pieces, model, self.ping_interval_s)
            )
        return await collect_body(prepared, first, pieces, http_request, model)

    def error_response(self, status: int, detail: dict, headers: dict | None) -> Response:
        return anthropic_error(status, detail, headers)
