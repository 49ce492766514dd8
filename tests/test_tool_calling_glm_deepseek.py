"""GLM-4.5 and DeepSeek-V3.1 tool calls and reasoning through the chat service, on tiny
random models with those families' tokens and real chat templates (tests/tool_models.py).

As in test_tool_calling.py: forced calls (tool_choice required or named) must always be
valid calls whose arguments validate, and where a test needs the model to write given
text, a response_format grammar makes it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.frontend.tool_parsers import DeepSeekV31ToolParser, Glm45ToolParser
from tests.tool_calling_cases import (
    ASK,
    SCHEMAS,
    assert_valid_calls,
    eos_id,
    plain,
    streamed_message,
)
from tests.tool_calling_cases import TOOLS as PLAIN_TOOLS
from tests.tool_models import answer_all

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]

FAMILIES = ["glm45", "deepseek_v31"]
# vLLM's DeepSeek-V3.1 template writes every tool's description (a tool without one is a
# template error, so a 400).
TOOLS = [
    {
        **tool,
        "function": {"description": f"The {tool['function']['name']} tool", **tool["function"]},
    }
    for tool in PLAIN_TOOLS
]
# Each family's switch for thinking in its template.
THINKING = {
    "glm45": lambda on: {"enable_thinking": on},
    "deepseek_v31": lambda on: {"thinking": on},
}


def request(family: str, thinking: bool = False, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": ASK,
        "tools": TOOLS,
        "max_tokens": 400,
        "chat_template_args": THINKING[family](thinking),
    }
    body.update(fields)
    return body


def forced_text(text: str) -> dict[str, Any]:
    return {"type": "grammar", "grammar": f"root ::= {json.dumps(text)}"}


CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"

# Some text, then two calls, in each format. GLM's "a" and "b" are integers by the
# schema: read as JSON; "city" is a string: kept as text.
WRITTEN = {
    "glm45": "Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Paris</arg_value>\n</tool_call>\n<tool_call>add\n<arg_key>a</arg_key>\n"
    "<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
    "deepseek_v31": f'Let me check.{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"city": "Paris"}}'
    f'{CALL_END}{CALL_BEGIN}add{SEP}{{"a": 1, "b": 2}}{CALL_END}{CALLS_END}',
}
WRITTEN_CALLS = [
    {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"name": "add", "arguments": '{"a": 1, "b": 2}'},
]


def test_the_parser_is_detected_from_each_template(services) -> None:
    for family, parser in [("glm45", Glm45ToolParser), ("deepseek_v31", DeepSeekV31ToolParser)]:
        assert services(family).frontend.formats.tool_parser is parser


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_calls_are_always_valid(services, family: str) -> None:
    service = services(family)
    # A bias towards ending (EOS; DeepSeek's end of the calls section, after which EOS
    # is all the grammar allows) keeps the number of parallel calls small, and max_tokens
    # leaves room for the long tail (see test_tool_calling).
    ends = [eos_id(service), service.frontend.tokenizer.convert_tokens_to_ids(CALLS_END)]
    bias = {str(token): 5.0 for token in ends if token != service.frontend.tokenizer.unk_token_id}
    required = [
        request(
            family, tool_choice="required", temperature=1, seed=i, logit_bias=bias, max_tokens=1500
        )
        for i in range(16)
    ]
    named = [
        request(
            family,
            tool_choice={
                "type": "function",
                "function": {"name": TOOLS[i % 3]["function"]["name"]},
            },
            temperature=1,
            seed=100 + i,
        )
        for i in range(6)
    ]
    results = answer_all(service, required + named)
    for response in results[:16]:
        assert_valid_calls(response, set(SCHEMAS))
    for i, response in enumerate(results[16:]):
        calls = assert_valid_calls(response, {TOOLS[i % 3]["function"]["name"]})
        assert len(calls) == 1


# A random model thinks until max_tokens: what the forced-call grammar accepts after
# thinking is checked on the grammar itself.
GRAMMAR_CASES = {
    "glm45": [
        (
            "free",
            "\n<think>hmm</think>\n" + WRITTEN["glm45"].removeprefix("Let me check.\n"),
            True,
        ),
        ("closed", WRITTEN["glm45"].removeprefix("Let me check.\n"), True),
        (
            "closed",
            "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
            False,
        ),
        (
            "closed",
            "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n<arg_value>x</arg_value>\n</tool_call>",
            False,
        ),
        (
            "closed",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>",
            True,
        ),
        (
            "closed",
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>unit</arg_key>\n<arg_value>kelvin</arg_value>\n</tool_call>",
            False,
        ),
    ],
    "deepseek_v31": [
        ("open", "hmm</think>" + WRITTEN["deepseek_v31"].removeprefix("Let me check."), True),
        ("closed", WRITTEN["deepseek_v31"].removeprefix("Let me check."), True),
        ("closed", f'{CALLS_BEGIN}{CALL_BEGIN}add{SEP}{{"a": 1}}{CALL_END}{CALLS_END}', False),
        ("closed", f"{CALLS_BEGIN}{CALLS_END}", False),
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_call_grammar_accepts_calls_after_thinking(services, family: str) -> None:
    import xgrammar as xgr

    from flashserve.api.frontend.tools import plan_tools

    service = services(family)
    parser = service.frontend.formats.tool_parser
    plan = plan_tools(TOOLS, "required", True)
    for thinking, text, ok in GRAMMAR_CASES[family]:
        spec = service.frontend.tool_grammars.spec(parser, plan, thinking)
        matcher = xgr.GrammarMatcher(service.frontend.structured.compiler().compile(spec).compiled)
        accepted = matcher.accept_string(text) and matcher.accept_token(eos_id(service))
        assert accepted == ok, (thinking, text)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_calls_equal_the_non_streamed_message(services, family: str) -> None:
    service = services(family)
    body = request(family, tool_choice="required", temperature=1, seed=7)
    whole = answer_all(service, [body])[0]
    events = answer_all(service, [{**body, "stream": True}])[0]
    content, calls, finishes = streamed_message(events)
    assert calls == plain(assert_valid_calls(whole, set(SCHEMAS)))
    assert content == "" and finishes == ["tool_calls"]


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_separates_text_and_calls(services, family: str) -> None:
    service = services(family)
    body = request(family, response_format=forced_text(WRITTEN[family]), seed=3)
    whole = answer_all(service, [body])[0]
    message = whole["choices"][0]["message"]
    assert plain(message["tool_calls"]) == WRITTEN_CALLS
    assert message["content"] == "Let me check."
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    events = answer_all(service, [{**body, "stream": True}])[0]
    assert streamed_message(events) == ("Let me check.", WRITTEN_CALLS, ["tool_calls"])


@pytest.mark.parametrize("family", FAMILIES)
def test_reasoning_then_calls(services, family: str) -> None:
    service = services(family)
    body = request(family, thinking=True)
    prompt = render_prompt(service.frontend.tokenizer, ChatRequest.model_validate(body))
    calls = WRITTEN[family].removeprefix("Let me check.")
    if family == "deepseek_v31":
        # The output starts thinking (vLLM's template leaves its indentation in the prompt).
        assert prompt.rstrip().endswith("<think>")
        text = "Paris first.</think>" + calls
    else:
        assert prompt.rstrip().endswith("<|assistant|>")  # the model may open a block
        text = "\n<think>Paris first.</think>\n" + calls
    body["response_format"] = forced_text(text)
    whole, events = answer_all(service, [body, {**body, "stream": True}])
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "Paris first."
    assert message["content"] is None
    assert plain(message["tool_calls"]) == WRITTEN_CALLS
    assert streamed_message(events) == ("", WRITTEN_CALLS, ["tool_calls"])
    reasoning = "".join(
        e["choices"][0]["delta"].get("reasoning_content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )
    assert reasoning == "Paris first."


RENDERED_CALL = {
    "glm45": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
    "deepseek_v31": f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"city": "Paris", "days": 2}}'
    f"{CALL_END}",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_history_renders_calls_and_results(services, family: str) -> None:
    service = services(family)
    call = {
        "id": "call_abc123",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    # OpenAI clients send back a calls-only turn with content None (DeepSeek's template
    # fails on the missing key if it is passed through as is).
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "22 degrees, sunny"},
    ]
    body = request(family, messages=messages, max_tokens=4)
    prompt = render_prompt(service.frontend.tokenizer, ChatRequest.model_validate(body))
    assert RENDERED_CALL[family] in prompt
    assert "22 degrees, sunny" in prompt
    response = answer_all(service, [body])[0]
    assert response["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_choice_none_bans_the_call_markers(services, family: str) -> None:
    service = services(family)
    bodies = [
        request(family, tool_choice="none", temperature=1, max_tokens=16, seed=i) for i in range(4)
    ]
    for response in answer_all(service, bodies):
        choice = response["choices"][0]
        assert "tool_calls" not in choice["message"]
    banned = service.frontend.formats.start_marker_ids(bodies[0].get("chat_template"))
    assert len(banned) == 1 if family == "glm45" else len(banned) == 2
