"""Speculation through the chat service: structured outputs, forced tool calls, stop
strings and streaming give what they give without it.

Two in-process chat services over the same tiny Hermes-format model, one speculating
on every draft. Greedy answers must be equal, valid where a grammar applies, and a
stream must join to its non-streamed answer.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.tool_calling_cases import SCHEMAS, TOOLS, assert_valid_calls, request, streamed_message
from tests.tool_models import FAMILIES, answer_all, build_family, make_service

pytest_plugins = ["tests.tokenizer_fixtures"]

SPEC = dict(speculative_method="ngram", num_speculative_tokens=4, speculative_policy="always")
QUESTIONS = [
    "What is the weather in Paris?",
    "Add two numbers for me.",
    "Search the news about rivers.",
    "Describe a cat in JSON.",
    "Repeat after me: red green blue red green blue.",
    "List three colours.",
    "Tell me about Rome.",
    "Count to ten.",
]
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "colour": {"enum": ["red", "green", "blue"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "colour", "legs"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def services(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    base_dir = request.getfixturevalue(f"{FAMILIES['hermes'].base}_tokenizer_dir")
    folder = build_family("hermes", base_dir, tmp_path_factory.mktemp("spec_hermes"))
    plain = make_service(folder, kv_cache_memory_gb=0.1, cpu_threads=1)
    spec = make_service(folder, kv_cache_memory_gb=0.1, cpu_threads=1, **SPEC)
    yield plain, spec
    for service in (plain, spec):
        service.frontend.engine.shutdown()


def ask(question: str, **fields: Any) -> dict[str, Any]:
    body = request("hermes", temperature=0, **fields)
    body["messages"] = [{"role": "user", "content": question}]
    return body


def both(services, bodies: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    plain, spec = services
    return answer_all(plain, bodies), answer_all(spec, bodies)


def stats(services):
    return services[1].frontend.engine.engine.speculator.stats


def test_json_schema_answers_are_equal_and_valid(services) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}
    bodies = [
        ask(q, response_format=response_format, max_tokens=300, tools=None) for q in QUESTIONS
    ]
    before = stats(services).accepted_tokens
    want, got = both(services, bodies)
    for a, b in zip(want, got):
        assert b["choices"][0]["message"] == a["choices"][0]["message"]
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(b["choices"][0]["message"]["content"]), ITEM)
        assert b["usage"] == a["usage"]
    assert stats(services).accepted_tokens > before


def test_forced_tool_calls_are_equal_and_valid(services) -> None:
    names = [tool["function"]["name"] for tool in TOOLS]
    bodies = [ask(q, tool_choice="required", max_tokens=400) for q in QUESTIONS] + [
        ask(q, tool_choice={"type": "function", "function": {"name": names[i % 3]}})
        for i, q in enumerate(QUESTIONS)
    ]
    before = stats(services).accepted_tokens
    want, got = both(services, bodies)
    for body, a, b in zip(bodies, want, got):
        calls = assert_valid_calls(b, set(SCHEMAS))
        assert [c["function"] for c in calls] == [
            c["function"] for c in a["choices"][0]["message"]["tool_calls"]
        ]
        if isinstance(body["tool_choice"], dict):
            assert {c["function"]["name"] for c in calls} == {
                body["tool_choice"]["function"]["name"]
            }
    assert stats(services).accepted_tokens > before


def test_stop_strings_cut_where_they_cut_without_speculation(services) -> None:
    free = [ask(q, max_tokens=60, tools=None) for q in QUESTIONS]
    texts = [r["choices"][0]["message"]["content"] for r in answer_all(services[0], free)]
    bodies = []
    for q, text in zip(QUESTIONS, texts):
        stripped = text.strip()
        if len(stripped) >= 12:
            middle = len(stripped) // 2
            bodies.append(ask(q, max_tokens=60, tools=None, stop=[stripped[middle : middle + 3]]))
    assert len(bodies) >= 4
    want, got = both(services, bodies)
    for a, b in zip(want, got):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"] == "stop"


def test_streams_join_to_the_non_streamed_answers(services) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": ITEM}}
    bodies = [ask(q, max_tokens=50, tools=None) for q in QUESTIONS[:4]]
    bodies += [ask(q, tool_choice="required", max_tokens=400) for q in QUESTIONS[4:6]]
    bodies += [ask(q, response_format=response_format, tools=None) for q in QUESTIONS[6:]]
    whole = answer_all(services[1], bodies)
    streamed = answer_all(services[1], [{**b, "stream": True} for b in bodies])
    for a, events in zip(whole, streamed):
        content, calls, finishes = streamed_message(events)
        message = a["choices"][0]["message"]
        assert content == (message["content"] or "")
        assert calls == [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls") or []
        ]
        assert finishes == [a["choices"][0]["finish_reason"]]
