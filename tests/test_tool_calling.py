"""Tool calling end to end on tiny random models in the Hermes, Llama 3 and Mistral formats.

A random model never means to call a tool, which is what makes it a good test of the
guarantees: under tool_choice "required" or a named function, constrained decoding alone
must turn its output into valid calls, every time. Where the tests need the model to
write given text (auto mode), a response_format grammar makes it.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from fastapi import HTTPException

from flashserve.api.chat import ChatService
from flashserve.api.prompt import render_prompt
from flashserve.api.protocol import ChatRequest
from flashserve.api.tool_grammar import grammar_schema
from flashserve.api.tool_parsers import HermesToolParser
from flashserve.api.tools import plan_tools
from tests.tool_models import answer_all

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures", "tests.server_fixture"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 8},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -50, "maximum": 50},
                    "b": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                    "tags": {"type": "array", "items": {"enum": ["news", "web"]}, "maxItems": 2},
                    "exact": {"type": "boolean"},
                },
                "required": ["query"],
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMES = ["hermes", "llama3", "mistral"]


# --------------------------------------------------------------------------- fixtures


def request(family: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": ASK, "tools": TOOLS, "max_tokens": 400}
    if family == "hermes":
        # Forced calls and thinking: the tests of thinking are in test_reasoning.py.
        body["chat_template_args"] = {"enable_thinking": False}
    body.update(fields)
    return body


def eos_id(service: ChatService) -> int:
    return service.engine.engine.eos_token_ids[0]


def assert_valid_calls(response: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    choice = response["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    assert choice["finish_reason"] == "tool_calls", choice
    assert calls and choice["message"]["content"] is None, choice
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])
    return calls


def streamed_message(events: list[Any]) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(content, calls, finish reasons) joined from a stream the way OpenAI clients do,
    checking the shape of each tool-call delta on the way."""
    content, calls, finishes = "", {}, []
    for event in events:
        if not isinstance(event, dict) or not event.get("choices"):
            continue
        choice = event["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        assert "<tool_call>" not in content and "[TOOL_CALLS]" not in content
        for piece in delta.get("tool_calls") or []:
            if piece["index"] not in calls:
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                calls[piece["index"]] = {
                    "name": piece["function"]["name"],
                    "arguments": piece["function"].get("arguments", ""),
                }
            else:
                assert set(piece) == {"index", "function"}
                assert set(piece["function"]) == {"arguments"}
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    return content, [calls[i] for i in sorted(calls)], finishes


def plain(calls: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]


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
    prompt = render_prompt(service.tokenizer, ChatRequest.model_validate(bodies[0]))
    assert "get_weather" not in prompt
    auto = render_prompt(service.tokenizer, ChatRequest.model_validate(request(family)))
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
    prompt = render_prompt(service.tokenizer, ChatRequest.model_validate(body))
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
        spec = service.tool_grammars.spec(HermesToolParser, plan, thinking)
        matcher = xgr.GrammarMatcher(service.structured.compiler().compile(spec).compiled)
        accepted = matcher.accept_string(text)
        assert accepted == ok, (thinking, text)
        if ok:
            assert matcher.accept_token(eos_id(service)) and matcher.is_terminated()


def test_grammar_schema_bounds_strings_without_changing_what_validates() -> None:
    schema = {
        "properties": {
            "a": {"type": "string", "maxLength": 4},
            "b": {"type": "array", "items": {"type": "string", "minLength": 2}},
            "c": {"type": "string", "maxLength": 3, "enum": ["x"]},
        }
    }
    out = grammar_schema(schema)
    assert out["type"] == "object" and "type" not in schema  # the request's copy is untouched
    assert out["properties"]["a"] == {"type": "string", "pattern": '^[^"\\\\\\x00-\\x1f]{0,4}$'}
    assert out["properties"]["b"]["items"]["pattern"].endswith("{2,}$")
    assert out["properties"]["c"] == schema["properties"]["c"]


# --------------------------------------------------------------------------- openai client


@pytest.fixture(scope="module")
def client(truss_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "get_weather"}}, "required"],
    ids=["named", "required"],
)
def test_openai_client_tool_calls_streamed_and_not(client: openai.OpenAI, tool_choice) -> None:
    kwargs = dict(
        model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1, seed=11,
        max_tokens=300, parallel_tool_calls=tool_choice == "required",
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if tool_choice != "required":
        assert [call.function.name for call in calls] == ["get_weather"]

    streamed: dict[int, dict[str, str]] = {}
    finishes = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or []:
            if piece.index not in streamed:
                assert piece.id and piece.type == "function" and piece.function.name
                streamed[piece.index] = {"name": piece.function.name, "arguments": ""}
            streamed[piece.index]["arguments"] += piece.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["tool_calls"]
    assert [streamed[i] for i in sorted(streamed)] == [
        {"name": call.function.name, "arguments": call.function.arguments} for call in calls
    ]


def test_detokenizer_shows_the_format_markers_it_is_told_to_keep(sp_tokenizer) -> None:
    from flashserve.api.detokenizer import IncrementalDetokenizer

    text = '[TOOL_CALLS] [{"name": "f", "arguments": {}}]'
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    marker = sp_tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    assert ids[0] == marker

    def run(keep: frozenset[int]) -> str:
        detok = IncrementalDetokenizer(sp_tokenizer, [1, 3, 4], keep_special_ids=keep)
        return "".join(detok.add_tokens([i]) for i in ids) + detok.flush()

    assert run(frozenset()) == '[{"name": "f", "arguments": {}}]'
    assert run(frozenset({marker})) == '[TOOL_CALLS][{"name": "f", "arguments": {}}]'
