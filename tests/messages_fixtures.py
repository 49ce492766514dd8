"""The in-process /v1/messages endpoint on a tiny thinking tool-calling model, and the
helpers the messages tests share (tests/test_messages_api.py, test_messages_validation.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.messages import MessagesEndpoint
from tests.messages_support import (
    build_thinking_model,
)
from tests.tool_models import make_service


@pytest.fixture(scope="module")
def chat(sp_tokenizer_dir, tmp_path_factory) -> Iterator[ChatEndpoint]:
    folder = build_thinking_model(sp_tokenizer_dir, tmp_path_factory.mktemp("thinking_model"))
    service = make_service(folder, kv_cache_memory_gb=0.1)
    yield service
    service.frontend.engine.shutdown()


@pytest.fixture(scope="module")
def messages(chat: ChatEndpoint) -> MessagesEndpoint:
    return MessagesEndpoint(chat.frontend)
