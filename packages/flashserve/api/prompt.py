"""Chat messages -> prompt token ids, through the model's (or the request's) chat template."""

from __future__ import annotations

from typing import Any

import jinja2

from flashserve.api.errors import RequestError
from flashserve.api.protocol import ChatRequest


def flatten_content(content: Any) -> Any:
    """Text-part arrays become one string: text-only templates expect a string."""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "content": flatten_content(m.get("content"))} for m in messages]


def render_prompt(tokenizer: Any, request: ChatRequest) -> str:
    """Render the conversation with the chat template; template faults are the caller's 400."""
    kwargs: dict[str, Any] = dict(request.chat_template_args or {})
    try:
        return tokenizer.apply_chat_template(
            template_messages(request.messages),
            tools=request.tools,
            documents=request.documents,
            chat_template=request.chat_template,
            add_generation_prompt=request.add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
    ) as exc:
        param = "chat_template" if request.chat_template else "messages"
        raise RequestError(
            f"The chat template could not render this conversation: {exc}", param=param
        ) from exc


def encode_prompt(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
