"""The Truss model: builds the flashserve engine and hands requests to its chat API.

No `from __future__ import annotations` here: Truss inspects the `request:
Request` annotation at runtime to decide what to pass in.
"""

import logging
from pathlib import Path
from typing import Any

from fastapi import Request

from flashserve.service import build_chat_service

logging.basicConfig(level=logging.INFO)


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config = kwargs["config"]
        self._data_dir = Path(kwargs["data_dir"]) if kwargs.get("data_dir") else None
        self._secrets = kwargs.get("secrets")
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._service = None

    def load(self) -> None:
        self._service = build_chat_service(
            self._config, self._data_dir, self._secrets, self._lazy_data_resolver
        )

    async def predict(self, model_input: Any, request: Request) -> Any:
        """POST /predict: the same chat-completions request and response."""
        return await self._service.create(model_input, request)

    async def chat_completions(self, model_input: Any, request: Request) -> Any:
        """POST /v1/chat/completions: OpenAI-compatible chat completions."""
        return await self._service.create(model_input, request)

    def is_healthy(self) -> bool:
        # False once the engine loop has died, so Baseten restarts the replica.
        return self._service is not None and self._service.engine.healthy
