"""Fuzz /v1/completions in process: bodies drawn from data/CompletionRequest.schema.json.

Properties: a body the schema accepts is served (one choice per prompt, a well-formed
body or stream) or refused with a 400 in OpenAI's error shape, never anything else; a
body with a field the schema does not know is a 400 naming it; and the engine is left
with nothing running. Derandomized, like tests/test_fuzz.py (FLASHSERVE_FUZZ_EXAMPLES
and FLASHSERVE_FUZZ_RANDOM=1 for a longer run by hand).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi import HTTPException
from hypothesis import event, given
from hypothesis import strategies as st

from flashserve.api.endpoints.completions import SCHEMA_FILENAME, CompletionsEndpoint
from flashserve.api.endpoints.request_schema import load_schema
from tests.chat_harness import call, make_service
from tests.schema_fuzz import (
    ACCEPTED,
    JSON_VALUES,
    MAX_ITEMS,
    MAX_TEXT,
    OVERRIDES,
    from_schema,
    fuzz_examples,
    fuzz_settings,
)

FUZZ = fuzz_settings(fuzz_examples(40))
SCHEMA = load_schema(filename=SCHEMA_FILENAME)
ERROR_KEYS = {"message", "type", "param", "code"}

# Token ids a little past the embedded model's vocabulary too (32768): those are 400s.
TOKEN_IDS = st.lists(st.integers(0, 33000), min_size=1, max_size=8)
TEXT = st.text(max_size=MAX_TEXT)
PROMPTS = st.one_of(
    TEXT,
    st.lists(TEXT, min_size=1, max_size=MAX_ITEMS),
    TOKEN_IDS,
    st.lists(TOKEN_IDS, min_size=1, max_size=MAX_ITEMS),
)
NARROW = {
    **OVERRIDES,
    "prompt": PROMPTS,
    "logprobs": st.integers(0, 5),
    "suffix": TEXT,
    "echo": st.booleans(),
}


def _field(name: str, node: dict[str, Any]) -> st.SearchStrategy:
    if name in NARROW:
        return NARROW[name]
    generic = from_schema(node)
    return st.one_of(ACCEPTED[name], generic) if name in ACCEPTED else generic


def valid_bodies() -> st.SearchStrategy[dict[str, Any]]:
    # Always bounded: max_tokens drives the cost of a request.
    required = {*SCHEMA["required"], "max_tokens"}
    fields = {name: _field(name, node) for name, node in SCHEMA["properties"].items()}
    return st.fixed_dictionaries(
        {k: v for k, v in fields.items() if k in required},
        optional={k: v for k, v in fields.items() if k not in required},
    )


@pytest.fixture(scope="module")
def endpoint() -> CompletionsEndpoint:
    return CompletionsEndpoint(make_service().frontend)


def prompt_count(prompt: Any) -> int:
    if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
        return 1
    return len(prompt)


def assert_400(caught: HTTPException) -> dict:
    assert caught.status_code == 400, (caught.status_code, caught.detail)
    assert set(caught.detail) == ERROR_KEYS and caught.detail["type"] == "invalid_request_error"
    return caught.detail


def assert_idle(endpoint: CompletionsEndpoint) -> None:
    engine = endpoint.frontend.engine.engine
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_work() and not any(engine.block_manager.ref_counts)


@FUZZ
@given(body=valid_bodies())
def test_valid_bodies_are_served_or_refused_with_400(endpoint, body) -> None:
    try:
        reply = call(endpoint, body)
    except HTTPException as caught:
        event(f"refused: {assert_400(caught)['param']}")
    else:
        event("served")
        choices = prompt_count(body["prompt"])
        if body.get("stream") is True:
            assert reply[-1] == "[DONE]"
            events = reply[:-1]
            assert all(e.get("object") == "text_completion" for e in events), events
            finished = [c["index"] for e in events for c in e["choices"] if c["finish_reason"]]
            assert sorted(finished) == list(range(choices))
        else:
            assert reply["object"] == "text_completion"
            assert [c["index"] for c in reply["choices"]] == list(range(choices))
            assert reply["usage"]["completion_tokens"] <= choices * body["max_tokens"]
    assert_idle(endpoint)


@FUZZ
@given(
    body=valid_bodies(),
    key=st.text(min_size=1, max_size=12).filter(lambda k: k not in SCHEMA["properties"]),
    value=JSON_VALUES,
)
def test_an_unknown_field_is_a_400_naming_it(endpoint, body, key, value) -> None:
    with pytest.raises(HTTPException) as caught:
        call(endpoint, {**body, key: value})
    detail = assert_400(caught.value)
    # Unless the body fails earlier on a field of its own.
    if detail["param"] != key:
        assert not detail["message"].startswith("Unknown field")
