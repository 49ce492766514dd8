"""Every endpoint serves a request that names another model, and logs the name it was given.

The four endpoints prepare their own body shapes over one in-process frontend
(tests/chat_harness.py); the logged name is clipped so that a log line stays a line.
"""

from __future__ import annotations

import logging

import pytest

from flashserve.api.endpoints.base import LOG_FIELD_CHARS
from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.completions import CompletionsEndpoint
from flashserve.api.endpoints.messages import MessagesEndpoint
from flashserve.api.endpoints.responses import ResponsesEndpoint
from tests.chat_harness import USER, make_service

BODIES = {
    ChatEndpoint: lambda model: {"model": model, "messages": USER, "max_tokens": 4},
    CompletionsEndpoint: lambda model: {"model": model, "prompt": "Once", "max_tokens": 4},
    MessagesEndpoint: lambda model: {"model": model, "messages": USER, "max_tokens": 4},
    ResponsesEndpoint: lambda model: {"model": model, "input": "Once", "max_output_tokens": 16},
}


@pytest.fixture(scope="module")
def frontend():
    service = make_service()
    yield service.frontend
    service.frontend.engine.shutdown()


@pytest.mark.parametrize("endpoint_cls", list(BODIES), ids=lambda cls: cls.__name__)
def test_other_model_name_is_served_and_logged_clipped(frontend, endpoint_cls, caplog) -> None:
    endpoint = endpoint_cls(frontend)
    asked = "other-model-" + "x" * 200  # longer than LOG_FIELD_CHARS, within every schema
    with caplog.at_level(logging.INFO, logger="flashserve.requests"):
        prepared = endpoint.prepare(BODIES[endpoint_cls](asked))
    assert prepared.generation.prompt_ids
    lines = [r.getMessage() for r in caplog.records if "request names model" in r.getMessage()]
    assert lines == [f"request names model {asked[:LOG_FIELD_CHARS]!r}; serving 'm'"]


@pytest.mark.parametrize("endpoint_cls", list(BODIES), ids=lambda cls: cls.__name__)
def test_served_model_name_is_not_logged(frontend, endpoint_cls, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="flashserve.requests"):
        endpoint_cls(frontend).prepare(BODIES[endpoint_cls]("m"))
    assert not [r for r in caplog.records if "request names model" in r.getMessage()]
