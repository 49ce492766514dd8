"""The chat-completions endpoint: a chat request -> its prompt -> the shared generation path.

Chat-only steps stay here: OpenAI's newer field names (chat_openai_names), the request's
schema and rules, rendering the messages with the chat template (the request's own one
jailed), and `echo` (the continued assistant message opens the response).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from flashserve.api.endpoints.base import Endpoint
from flashserve.api.endpoints.chat_format import PreparedChat, collect_body, stream_events
from flashserve.api.endpoints.chat_openai_names import translate, with_client_names
from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.request_schema import RequestValidator
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.frontend.prompt import echo_prefix, render_prompt
from flashserve.api.http.errors import RequestError
from flashserve.api.http.sse import EventStreamResponse


class ChatEndpoint(Endpoint):
    def __init__(self, frontend: ModelFrontend, validator: RequestValidator | None = None) -> None:
        self.validator = validator or RequestValidator()
        super().__init__(frontend, self.validator.max_bytes)

    def uses_own_template(self, body: Any) -> bool:
        return isinstance(body, dict) and bool(body.get("chat_template"))

    def prepare(self, body: Any, http_request: Any = None) -> PreparedChat:
        body, renames = translate(body)
        try:
            return self._prepare(body, http_request)
        except RequestError as exc:
            raise with_client_names(exc, renames) from exc

    def _prepare(self, body: Any, http_request: Any) -> PreparedChat:
        frontend = self.frontend
        body = self.validator.validate(body)
        request = ChatRequest.model_validate(body)
        self.log_model_name(request.model)
        text = self._render(request)
        prompt_ids = frontend.tokenize(text, request, param="messages")
        generation = frontend.build(
            request,
            self.request_id("chatcmpl-", http_request),
            text,
            prompt_ids,
            chat_template=request.chat_template,
        )
        return PreparedChat(request=request, generation=generation, echo=echo_prefix(request) or "")

    async def respond(
        self,
        prepared: PreparedChat,
        first: Piece | None,
        pieces: AsyncIterator[Piece],
        http_request: Any,
    ) -> dict | Response:
        model = self.frontend.served_model_name
        if prepared.request.stream:
            return EventStreamResponse(stream_events(prepared, first, pieces, model))
        return await collect_body(prepared, first, pieces, http_request, model)

    def _render(self, request: ChatRequest) -> str:
        render = lambda: render_prompt(self.frontend.tokenizer, request)  # noqa: E731
        return self.frontend.render_own_template(render) if request.chat_template else render()
