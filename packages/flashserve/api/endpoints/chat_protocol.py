"""The chat request as a typed object (after the JSON Schema has accepted it)."""

from __future__ import annotations

from typing import Any

from flashserve.api.frontend.options import GenerationOptions


class ChatRequest(GenerationOptions):
    """The shared generation settings plus what only chat has: messages and their rendering."""

    messages: list[dict[str, Any]]
    model: str
    n: int = 1
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool = False
    echo: bool = False
    add_generation_prompt: bool = True
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_args: dict[str, Any] | None = None
