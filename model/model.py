"""The Truss model: builds the flashserve engine and routes each endpoint to its handler.

No `from __future__ import annotations` here: Truss inspects the `request:
Request` annotation at runtime to decide what to pass in.
"""

import logging
from pathlib import Path
from typing import Any

from fastapi import Request

from flashserve.api.endpoints.embeddings import embeddings_unsupported
from flashserve.service import build_service

logging.basicConfig(level=logging.INFO)


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._data_dir = Path(kwargs["data_dir"]) if kwargs.get("data_dir") else None
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service = None

    def load(self) -> None:
        self._service = build_service(
            self._config, self._data_dir, self._secrets, self._lazy_data_resolver
        )

    # The methods take the raw request only, so Truss skips its own body parsing (which
    # answers invalid UTF-8 or deep nesting with a 500) and the endpoint parses the bytes.

    async def predict(self, request: Request) -> Any:
        """POST /predict: the same chat-completions request and response."""
        return await self._service.chat.handle(request)

    async def chat_completions(self, request: Request) -> Any:
        """POST /v1/chat/completions: OpenAI-compatible chat completions."""
        return await self._service.chat.handle(request)

    async def completions(self, request: Request) -> Any:
        """POST /v1/completions: OpenAI legacy completions."""
        return await self._service.completions.handle(request)

    async def messages(self, request: Request) -> Any:
        """POST /v1/messages: the Anthropic Messages API."""
        return await self._service.messages.handle(request)

    async def responses(self, request: Request) -> Any:
        """POST /v1/responses: the OpenAI Responses API."""
        return await self._service.responses.handle(request)

    async def embeddings(self, request: Request) -> Any:
        """POST /v1/embeddings: refused, this deployment serves a generative model."""
        return embeddings_unsupported(self._service.frontend.served_model_name)

    def is_healthy(self) -> bool:
        # False once the engine loop has died or wedged, so Baseten restarts the replica.
        return self._service is not None and self._service.engine.healthy
