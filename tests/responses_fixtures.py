"""The in-process /v1/responses endpoint over the embedded model (Mistral-format tools,
no reasoning), for the tests/test_responses_*.py modules that run it. Its chat endpoint is
`embedded_chat`, not `chat`: these fixtures are visible to every module once a module
lists this plugin, and tests/messages_fixtures.py has a `chat` of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.responses import ResponsesEndpoint
from tests.chat_harness import make_service


@pytest.fixture(scope="module")
def embedded_chat() -> Iterator[ChatEndpoint]:
    service = make_service()
    yield service
    service.frontend.engine.shutdown()


@pytest.fixture(scope="module")
def responses(embedded_chat: ChatEndpoint) -> ResponsesEndpoint:
    return ResponsesEndpoint(embedded_chat.frontend)
