"""The Responses endpoint (POST /v1/responses): a Responses request -> the chat template's
prompt -> the shared generation path -> output items.

Responses-only steps stay here: the request's schema and rules, continuing a stored
response (`previous_response_id`), and keeping each response for its follow-ups (`store`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.responses import Response

from flashserve.api.endpoints.base import Endpoint
from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.request_schema import RequestValidator, check_depth
from flashserve.api.endpoints.responses_format import (
    PreparedResponse,
    collect_body,
    stream_events,
)
from flashserve.api.endpoints.responses_protocol import (
    ENCRYPTED_REASONING_INCLUDE,
    SCHEMA_FILENAME,
    chat_fields,
    check_chat_tools,
    check_rules,
    check_supported,
    input_items,
    renamed,
    to_messages,
    truncation_points,
    with_item_types,
    without_oldest,
)
from flashserve.api.endpoints.responses_store import ResponseStore
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.output.text_output import Piece
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.http.errors import RequestError
from flashserve.api.http.sse import EventStreamResponse

# packages/flashserve/api/endpoints/responses.py -> the repository root holds data/.
REPO_SCHEMA_PATH = Path(__file__).resolve().parents[4] / "data" / SCHEMA_FILENAME


def schema_path(data_dir: Path | None) -> Path:
    """The request schema: in the Truss's data dir (the serving image), else the repo's."""
    if data_dir is not None and (Path(data_dir) / SCHEMA_FILENAME).is_file():
        return Path(data_dir) / SCHEMA_FILENAME
    return REPO_SCHEMA_PATH


class ResponsesEndpoint(Endpoint):
    def __init__(
        self,
        frontend: ModelFrontend,
        data_dir: Path | None = None,
        store: ResponseStore | None = None,
    ) -> None:
        self.validator = RequestValidator(
            schema_path(data_dir), schema_filename=SCHEMA_FILENAME, semantics=check_rules
        )
        self.store = store if store is not None else ResponseStore()
        super().__init__(frontend, self.validator.max_bytes)

    def prepare(self, body: Any, http_request: Any = None) -> PreparedResponse:
        try:
            return self._prepare(body, http_request)
        except RequestError as exc:
            truncating = isinstance(body, dict) and body.get("truncation") == "auto"
            raise renamed(exc, truncating) from exc

    def _prepare(self, body: Any, http_request: Any) -> PreparedResponse:
        frontend, validator = self.frontend, self.validator
        if isinstance(body, dict):
            check_depth(body, validator.max_depth, max_bytes=validator.max_bytes)
            body = with_item_types(body)
            check_supported(body)
        body = validator.validate(body)
        model = body.get("model") or frontend.served_model_name
        self.log_model_name(model)
        history = self._history(body.get("previous_response_id"))
        items = history + input_items(body["input"])
        check_chat_tools(chat_fields(body, [], frontend.served_model_name))
        auto = body.get("truncation") == "auto"
        try:
            # The whole conversation is checked (function outputs answer calls), rendered.
            whole = self._prompt(body, items, first_new=len(history))
        except RequestError as exc:
            if not (auto and exc.code == "context_length_exceeded"):
                raise
            whole = None
        if auto:
            items, options, text, prompt_ids = self._fit(body, items, whole)
        else:
            assert whole is not None
            options, text, prompt_ids = whole
        generation = frontend.build(
            options, self.request_id("resp_", http_request), text, prompt_ids, prompt_param="input"
        )
        return PreparedResponse(
            generation=generation,
            echo=self._echo(body, generation.params, frontend.served_model_name),
            items=items,
            stream=options.stream,
            store=body.get("store", True),
            logprobs=options.logprobs,
            sealed_reasoning=ENCRYPTED_REASONING_INCLUDE in (body.get("include") or ()),
        )

    async def respond(
        self,
        prepared: PreparedResponse,
        first: Piece | None,
        pieces: AsyncIterator[Piece],
        http_request: Any,
    ) -> dict | Response:
        def keep(response: dict[str, Any]) -> None:
            if prepared.store:
                self.store.put(response["id"], [*prepared.items, *response["output"]])

        if prepared.stream:
            return EventStreamResponse(stream_events(prepared, first, pieces, keep))
        return await collect_body(prepared, first, pieces, http_request, keep)

    def _prompt(
        self, body: dict[str, Any], items: list[dict[str, Any]], first_new: int
    ) -> tuple[ChatRequest, str, list[int]]:
        """The conversation's chat request, rendered prompt and prompt ids."""
        frontend = self.frontend
        messages = to_messages(items, body.get("instructions"), first_new)
        options = ChatRequest.model_validate(
            chat_fields(body, messages, frontend.served_model_name)
        )
        text = render_prompt(frontend.tokenizer, options)
        return options, text, frontend.tokenize(text, options, param="input")

    def _fit(
        self,
        body: dict[str, Any],
        items: list[dict[str, Any]],
        whole: tuple[ChatRequest, str, list[int]] | None,
    ) -> tuple[list[dict[str, Any]], ChatRequest, str, list[int]]:
        """truncation "auto": the longest tail of the conversation (from a user message on,
        system messages kept) whose prompt leaves room for max_output_tokens (or one token).
        Found by bisection over the cut points, one render each. If no tail fits, the
        shortest goes on (and the context error, if any, comes from the shared path)."""
        need = body.get("max_output_tokens") or 1
        limit = self.frontend.max_model_len

        def attempt(cut: int) -> tuple[list[dict[str, Any]], ChatRequest, str, list[int]] | None:
            kept = without_oldest(items, cut)
            try:
                # first_new past the end: the whole conversation was checked already.
                options, text, ids = self._prompt(body, kept, first_new=len(kept))
            except RequestError as exc:
                if exc.code == "context_length_exceeded":
                    return None
                raise
            return (kept, options, text, ids) if len(ids) + need <= limit else None

        if whole is not None and len(whole[2]) + need <= limit:
            return (items, *whole)
        points = truncation_points(items)
        low, high, best = 1, len(points) - 1, None
        while low <= high:  # the smallest cut that fits: fewer items, fewer tokens
            middle = (low + high) // 2
            fitted = attempt(points[middle])
            if fitted is None:
                low = middle + 1
            else:
                best, high = fitted, middle - 1
        if best is not None:
            return best
        kept = without_oldest(items, points[-1])
        return (kept, *self._prompt(body, kept, first_new=len(kept)))

    def _history(self, previous_id: str | None) -> list[dict[str, Any]]:
        if previous_id is None:
            return []
        stored = self.store.get(previous_id)
        if stored is None:
            raise RequestError(
                f"Previous response with id {previous_id!r:.80} not found: this replica keeps "
                f"its {self.store.max_entries} most recent stored responses in memory (not "
                "across restarts or replicas). Send the conversation as input items instead.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return list(stored.items)

    @staticmethod
    def _echo(body: dict[str, Any], params: Any, model: str) -> dict[str, Any]:
        """The request's settings as the response object repeats them."""
        reasoning = body.get("reasoning") or {}
        return {
            "model": model,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {},
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {
                "effort": reasoning.get("effort"),
                "summary": reasoning.get("summary") or reasoning.get("generate_summary"),
            },
            "store": body.get("store", True),
            "temperature": params.temperature,
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": [
                {"description": None, "parameters": None, "strict": None, **tool}
                for tool in body.get("tools") or ()
            ],
            "top_p": params.top_p,
            "top_logprobs": body.get("top_logprobs", 0),
            "truncation": body.get("truncation", "disabled"),
            "user": body.get("user"),
            "background": False,
        }
