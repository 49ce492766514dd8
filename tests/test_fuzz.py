"""Fuzz: request bodies generated from the request schema, sent over HTTP to the real server.

Properties: no body ever gets a 5xx; a body the schema rejects always gets a
400 in OpenAI's error shape; a body it accepts is served (200, a well-formed
completion or stream) or refused with a 400; damaged bytes get a 200 or a 400;
and the server still serves a plain request afterwards.

Runs are derandomized so CI sees the same bodies every time; set
FLASHSERVE_FUZZ_EXAMPLES (per property) and FLASHSERVE_FUZZ_RANDOM=1 for a
longer, exploring run by hand.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests.ops_client import CHAT, seeded
from tests.schema_fuzz import (
    corrupt_bytes,
    fuzz_examples,
    fuzz_settings,
    invalid_bodies,
    is_valid,
    valid_bodies,
)

pytest_plugins = ["tests.server_fixture"]
pytestmark = pytest.mark.slow

EXAMPLES = fuzz_examples(60)
FUZZ = fuzz_settings(EXAMPLES, HealthCheck.filter_too_much)
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def http(truss_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=truss_server, timeout=60) as client:
        yield client


def post(http: httpx.Client, body: Any) -> tuple[int, bytes]:
    response = http.post(
        CHAT, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    return response.status_code, response.content


def assert_error_shape(content: bytes) -> dict:
    error = json.loads(content)["error"]
    assert set(error) == ERROR_KEYS, error
    assert error["type"] == "invalid_request_error", error
    return error


def assert_served(body: dict, content: bytes) -> None:
    if body.get("stream") is True:
        lines = [line for line in content.decode().split("\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert not [e for e in events if "error" in e], events
        assert all(e["object"] == "chat.completion.chunk" for e in events)
    else:
        reply = json.loads(content)
        assert reply["object"] == "chat.completion", reply
        assert reply["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls"), reply
        assert reply["usage"]["completion_tokens"] <= body.get("max_tokens", 4)


@FUZZ
@given(body=valid_bodies())
def test_schema_valid_bodies_are_served_or_refused_with_400(http: httpx.Client, body: dict) -> None:
    status, content = post(http, body)
    assert status in (200, 400), (status, content[:500])
    if status == 200:
        assert_served(body, content)
    else:
        assert_error_shape(content)


@FUZZ
@given(body=invalid_bodies().filter(lambda b: not is_valid(b)))
def test_schema_invalid_bodies_get_400(http: httpx.Client, body: Any) -> None:
    status, content = post(http, body)
    assert status == 400, (status, content[:500])
    assert_error_shape(content)


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(raw=corrupt_bytes())
def test_damaged_bytes_get_200_or_400(http: httpx.Client, raw: bytes) -> None:
    response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert response.status_code in (200, 400), (response.status_code, response.text[:500])
    if response.status_code == 400:
        assert_error_shape(response.content)


def test_server_still_serves_after_the_fuzz(truss_server: str) -> None:
    assert httpx.get(f"{truss_server}/v1/models/model", timeout=10).status_code == 200
    reply = httpx.post(
        f"{truss_server}{CHAT}",
        json=seeded([{"role": "user", "content": "Still there?"}], 4),
        timeout=60,
    )
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 4
