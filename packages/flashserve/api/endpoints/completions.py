"""The /v1/completions endpoint (OpenAI legacy completions): prompts -> the shared
generation path, one generation per prompt, all running at once.

Completions-only steps stay here and in completions_*.py: the request's schema and
rules, the prompts' tokens (BOS convention, token ids, fill-in-the-middle), several
prompts as concurrent choices, `echo` and legacy logprobs. The output is the raw text:
no reasoning or tool-call split.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import Response

from flashserve.api.endpoints.base import Endpoint
from flashserve.api.endpoints.completions_choices import ChoicePiece, merge_choices
from flashserve.api.endpoints.completions_format import (
    PreparedCompletion,
    collect_body,
    stream_events,
)
from flashserve.api.endpoints.completions_prompt import PromptEncoder
from flashserve.api.endpoints.completions_protocol import to_request
from flashserve.api.endpoints.completions_rules import check_completion_semantics
from flashserve.api.endpoints.request_schema import RequestValidator
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.http.sse import EventStreamResponse

SCHEMA_FILENAME = "CompletionRequest.schema.json"


def completions_validator(schema_path: Any = None) -> RequestValidator:
    """The completions request schema (data/) with its own semantic rules."""
    return RequestValidator(
        schema_path, schema_filename=SCHEMA_FILENAME, semantics=check_completion_semantics
    )


class CompletionsEndpoint(Endpoint):
    def __init__(self, frontend: ModelFrontend, validator: RequestValidator | None = None) -> None:
        self.validator = validator or completions_validator()
        super().__init__(frontend, self.validator.max_bytes)
        self.prompts = PromptEncoder(frontend)

    def prepare(self, body: Any, http_request: Any = None) -> PreparedCompletion:
        frontend = self.frontend
        request = to_request(self.validator.validate(body))
        self.log_model_name(request.model)
        request_id = self.request_id("cmpl-", http_request)
        encoded = self.prompts.encode(request)
        generations = [
            frontend.build(
                request.options,
                # The engine's request ids must differ: one per prompt.
                request_id if len(encoded) == 1 else f"{request_id}-{index}",
                prompt.text,
                prompt.ids,
                prompt_param=prompt.param,
                raw_text=True,
            )
            for index, prompt in enumerate(encoded)
        ]
        echoes = [prompt.text if request.echo else "" for prompt in encoded]
        return PreparedCompletion(request, request_id, generations, echoes)

    def generate(self, prepared: PreparedCompletion) -> AsyncIterator[ChoicePiece]:
        deadline = prepared.generation.deadline
        for generation in prepared.generations:
            generation.deadline = deadline
        return merge_choices([self.frontend.generate(g) for g in prepared.generations])

    async def respond(
        self,
        prepared: PreparedCompletion,
        first: ChoicePiece | None,
        pieces: AsyncIterator[ChoicePiece],
        http_request: Any,
    ) -> dict | Response:
        model = self.frontend.served_model_name
        if prepared.request.stream:
            return EventStreamResponse(stream_events(prepared, first, pieces, model))
        return await collect_body(prepared, first, pieces, http_request, model)
