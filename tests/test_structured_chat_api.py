"""Structured outputs through ChatEndpoint: invalid formats rejected before any token,
streaming, logprobs, sampling controls and stop strings under a grammar, and a slow
compile that does not hold up other requests.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jsonschema
import pytest
from fastapi import HTTPException

from tests.chat_harness import call, content, make_service, streamed_content
from tests.structured_catalogue import SCHEMAS, schema_format
from tests.structured_harness import MAX_TOKENS

pytest_plugins = ["tests.tokenizer_fixtures", "tests.structured_harness"]


# -- through the chat API -------------------------------------------------------


def test_invalid_schema_is_rejected_before_any_token(sp):
    """Through the service: 400 from create(), and the engine never saw the request."""
    service = make_service()
    try:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
        with pytest.raises(HTTPException) as info:
            call(service, _body(response_format=bad))
        assert info.value.status_code == 400
        assert info.value.detail["param"] == "response_format.json_schema.schema"
        assert service.frontend.engine.engine.steps == 0
    finally:
        service.frontend.engine.shutdown()


def _body(**fields: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Give me JSON."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 1.0,
        **fields,
    }


@pytest.fixture(scope="module")
def service():
    service = make_service()
    yield service
    service.frontend.engine.shutdown()


def test_chat_api_streaming_logprobs_and_sampling_controls(service):
    schema_name = "array_of_objects"
    fmt = schema_format(schema_name)
    controls = dict(top_p=0.9, top_k=40, min_p=0.01, presence_penalty=0.5, seed=7)
    full = call(service, _body(response_format=fmt, logprobs=True, top_logprobs=2, **controls))
    text = content(full)
    jsonschema.validate(json.loads(text), SCHEMAS[schema_name])
    choice = full["choices"][0]
    assert choice["finish_reason"] == "stop"
    entries = choice["logprobs"]["content"]
    # Alternatives come from the masked distribution: where the grammar allows one token,
    # there is no second alternative (masked tokens are never listed).
    assert entries and all(1 <= len(e["top_logprobs"]) <= 2 for e in entries)
    assert any(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["logprob"] > float("-inf") for e in entries)

    events = call(service, _body(response_format=fmt, stream=True, **controls))
    assert json.loads(streamed_content(events)) == json.loads(text)  # same seed, same output
    finals = [e for e in events if isinstance(e, dict) and e.get("choices")]
    assert finals[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_api_stop_strings_still_cut_the_output(service):
    fmt = schema_format("const_matrix")
    out = call(service, _body(response_format=fmt, stop=['"matrix"'], seed=1))
    assert content(out) == '{"version": 2, '
    assert out["choices"][0]["finish_reason"] == "stop"


def test_slow_compile_does_not_stall_other_requests(service, monkeypatch):
    original = service.frontend.structured.compile
    compiled_at: list[float] = []

    def slow_compile(spec):
        time.sleep(2.0)  # a huge schema
        compiled_at.append(time.monotonic())
        return original(spec)

    monkeypatch.setattr(service.frontend.structured, "compile", slow_compile)
    finished: dict[str, float] = {}

    async def one(name: str, body: dict[str, Any]) -> None:
        await service.create(body)
        finished[name] = time.monotonic()

    async def both() -> None:
        slow = asyncio.create_task(one("slow", _body(response_format=schema_format("dice"))))
        await asyncio.sleep(0.05)  # the slow compile has started
        await one("plain", _body(max_tokens=4))
        await slow

    asyncio.run(both())
    # The plain request was served while the schema was still compiling.
    assert finished["plain"] < compiled_at[0] < finished["slow"]
