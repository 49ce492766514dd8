"""Tool calling end to end on tiny random models in the Hermes, Llama 3 and Mistral formats.

A random model never means to call a tool, which is what makes it a good test of the
guarantees: under tool_choice "required" or a named function, constrained decoding alone
must turn its output into valid calls, every time. Where the tests need the model to
write given text (auto mode), a response_format grammar makes it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import HTTPException

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.frontend.tool_parsers import HermesToolParser
from flashserve.api.frontend.tools import plan_tools
from tests.tool_calling_cases import (
    ASK,
    NAMES,
    SCHEMAS,
    TOOLS,
    assert_valid_calls,
    eos_id,
    plain,
    request,
    streamed_message,
)
from tests.tool_models import answer_all

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]


# --------------------------------------------------------------------------- guarantees


@pytest.mark.parametrize("family", NAMES)
def test_required_and_named_choices_always_yield_valid_calls(services, family: str) -> None:
    service = services(family)
    # A bias towards EOS keeps the number of parallel calls (the model's free choice)
    # small so the test stays quick, and max_tokens leaves room for the long tail (a
    # call cut short by max_tokens is the one way to get an invalid one); the grammar
    # alone decides what is valid.
    bias = {str(eos_id(service)): 5.0}
    required = [
        request(
            family, tool_choice="required", temperature=1, logit_bias=bias, seed=i, max_tokens=1500
        )
        for i in range(100)
    ]
    named = [
        request(
            family,
            tool_choice={
                "type": "function",
                "function": {"name": TOOLS[i % 3]["function"]["name"]},
            },
            temperature=1,
            seed=1000 + i,
        )
        for i in range(100)
    ]
    single = [
        request(family, tool_choice="required", parallel_tool_calls=False, temperature=1, seed=i)
        for i in range(50)
    ]
    results = answer_all(service, required + named + single)
    counts = []
    for response in results[:100]:
        counts.append(len(assert_valid_calls(response, set(SCHEMAS))))
    assert max(counts) > 1, "parallel calls are allowed and should occur"
    for i, response in enumerate(results[100:200]):
        calls = assert_valid_calls(response, {TOOLS[i % 3]["function"]["name"]})
        assert len(calls) == 1, "a named tool_choice calls that function exactly once"
    for response in results[200:]:
        assert len(assert_valid_calls(response, set(SCHEMAS))) == 1


@pytest.mark.parametrize("family", NAMES)
def test_tool_choice_none_yields_no_calls(services, family: str) -> None:
    service = services(family)
    bodies = [
        request(family, tool_choice="none", temperature=1, max_tokens=24, seed=i) for i in range(10)
    ]
    for response in answer_all(service, bodies):
        choice = response["choices"][0]
        assert "tool_calls" not in choice["message"]
        assert choice["finish_reason"] in ("stop", "length")
        assert "<tool_call>" not in choice["message"]["content"]
    # The tools are not shown to the model at all.
    prompt = render_prompt(service.frontend.tokenizer, ChatRequest.model_validate(bodies[0]))
    assert "get_weather" not in prompt
    auto = render_prompt(service.frontend.tokenizer, ChatRequest.model_validate(request(family)))
    assert "get_weather" in auto


@pytest.mark.parametrize("family", NAMES)
def test_streamed_calls_equal_the_non_streamed_message(services, family: str) -> None:
    service = services(family)
    bias = {str(eos_id(service)): 2.0}
    for seed in range(3):
        body = request(
            family,
            tool_choice="required",
            temperature=1,
            seed=seed,
            logit_bias=bias,
            max_tokens=1500,
        )
        whole = answer_all(service, [body])[0]
        events = answer_all(service, [{**body, "stream": True}])[0]
        content, calls, finishes = streamed_message(events)
        assert calls == plain(assert_valid_calls(whole, set(SCHEMAS)))
        assert content == "" and finishes == ["tool_calls"]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-1] == "[DONE]"


# --------------------------------------------------------------------------- auto mode

# What the model is made to write in each format (by a response_format grammar): some
# text, then two calls.
WRITTEN = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
    '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
    "</tool_call>",
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "add", "parameters": {"a": 1, "b": 2}}',
    "mistral": 'Let me check.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": '
    '"Paris"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]',
}
WRITTEN_CALLS = [
    {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"name": "add", "arguments": '{"a": 1, "b": 2}'},
]


def forced_text(text: str) -> dict[str, Any]:
    return {"type": "grammar", "grammar": f"root ::= {json.dumps(text)}"}


@pytest.mark.parametrize("family", NAMES)
def test_auto_separates_text_and_calls(services, family: str) -> None:
    service = services(family)
    body = request(family, response_format=forced_text(WRITTEN[family]), temperature=1, seed=3)
    whole = answer_all(service, [body])[0]
    message = whole["choices"][0]["message"]
    expected_text = "" if family == "llama3" else "Let me check."
    assert plain(message["tool_calls"]) == WRITTEN_CALLS
    assert (message["content"] or "") == expected_text
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    events = answer_all(service, [{**body, "stream": True}])[0]
    assert streamed_message(events) == (expected_text, WRITTEN_CALLS, ["tool_calls"])


@pytest.mark.parametrize("family", NAMES)
def test_parallel_tool_calls_false_keeps_the_first_call(services, family: str) -> None:
    service = services(family)
    body = request(
        family, response_format=forced_text(WRITTEN[family]), parallel_tool_calls=False, seed=4
    )
    full = answer_all(service, [request(family, response_format=body["response_format"])])[0]
    for response in answer_all(service, [body, {**body, "stream": True}]):
        if isinstance(response, dict):
            assert plain(response["choices"][0]["message"]["tool_calls"]) == WRITTEN_CALLS[:1]
            assert response["choices"][0]["finish_reason"] == "tool_calls"
            # Generation stopped once the call was complete.
            used = response["usage"]["completion_tokens"]
            assert used < full["usage"]["completion_tokens"]
        else:
            _, calls, finishes = streamed_message(response)
            assert calls == WRITTEN_CALLS[:1] and finishes == ["tool_calls"]


# --------------------------------------------------------------------------- prompts

HISTORY_CALL = {
    "id": "call_abc123",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
RENDERED_CALL = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, '
    '"id": "call_abc123"}]',
}


@pytest.mark.parametrize("family", NAMES)
def test_multi_turn_history_renders_calls_and_results(services, family: str) -> None:
    service = services(family)
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [HISTORY_CALL]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "22 degrees, sunny"},
    ]
    body = request(family, messages=messages, max_tokens=4)
    prompt = render_prompt(service.frontend.tokenizer, ChatRequest.model_validate(body))
    # arguments arrive as a JSON string; the template writes them as the object.
    assert RENDERED_CALL[family] in prompt
    assert "22 degrees, sunny" in prompt
    response = answer_all(service, [body])[0]
    assert response["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


# --------------------------------------------------------------------------- refusals

BAD_REQUESTS = [
    (
        "duplicate names",
        {"tools": [TOOLS[0], TOOLS[0]]},
        "tools[1].function.name",
    ),
    (
        "invalid parameters schema",
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}},
                    },
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        "parameters not an object schema",
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        "bad name",
        {"tools": [{"type": "function", "function": {"name": "two words"}}]},
        "tools[0].function.name",
    ),
    (
        "named choice not declared",
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ("required without tools", {"tools": None, "tool_choice": "required"}, "tool_choice"),
    (
        "tool message answering no call",
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
        "messages[1].tool_call_id",
    ),
    (
        "required with response_format",
        {"tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
    ),
    (
        "forced call of a schema that cannot be compiled",
        {
            "tools": [
                TOOLS[0],
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"properties": {"a": {"$ref": "#/$defs/missing"}}},
                    },
                },
            ],
            "tool_choice": "required",
        },
        "tools[1].function.parameters",
    ),
    (
        "required with a template that has no tool format",
        {
            "tool_choice": "required",
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        },
        "tool_choice",
    ),
]


@pytest.mark.parametrize("why, fields, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_invalid_tool_requests_are_400(services, why: str, fields: dict, param: str) -> None:
    body = {k: v for k, v in request("mistral", **fields).items() if v is not None}
    with pytest.raises(HTTPException) as caught:
        answer_all(services("mistral"), [body])
    assert caught.value.status_code == 400, why
    assert caught.value.detail["param"] == param, caught.value.detail


# --------------------------------------------------------------------------- grammars


def test_forced_call_grammar_lets_a_thinking_model_think_first(services) -> None:
    import xgrammar as xgr

    service = services("hermes")
    plan = plan_tools(TOOLS, "required", True)
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    for thinking, text, ok in [
        ("free", f"<think>\nhmm\n</think>\n\n{call}", True),
        ("free", call, True),
        ("open", f"hmm</think>\n\n{call}", True),
        (None, f"<think>\nhmm\n</think>\n\n{call}", False),
        (None, call.replace('"b": 2', '"b": 22'), False),
    ]:
        spec = service.frontend.tool_grammars.spec(HermesToolParser, plan, thinking)
        matcher = xgr.GrammarMatcher(service.frontend.structured.compiler().compile(spec).compiled)
        accepted = matcher.accept_string(text)
        assert accepted == ok, (thinking, text)
        if ok:
            assert matcher.accept_token(eos_id(service)) and matcher.is_terminated()
