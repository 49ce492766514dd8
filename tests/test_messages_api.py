"""/v1/messages in process: validation, the mapping onto chat's prompt, content blocks,
stop reasons, the event stream, pings and disconnects, on a tiny thinking tool-calling
model (tests/messages_support.py). The official SDK against the real Truss server is
tests/test_messages_sdk.py.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from fastapi import HTTPException
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.messages import MessagesEndpoint, anthropic_error
from flashserve.api.endpoints.messages_format import stream_events, thinking_signature
from flashserve.api.endpoints.messages_protocol import TOOL_ERROR_PREFIX, chat_messages
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.frontend.thinking_budget import one_token_each
from flashserve.api.http.errors import RequestError
from flashserve.engine.sequence import SequenceOutput
from tests.chat_harness import recorded_tokens
from tests.messages_support import (
    ASK,
    TOOLS,
    body,
    build_thinking_model,
    call,
    parse_events,
    streamed_message,
)
from tests.tool_models import make_service

pytest_plugins = ["tests.tokenizer_fixtures"]


@pytest.fixture(scope="module")
def chat(sp_tokenizer_dir, tmp_path_factory) -> Iterator[ChatEndpoint]:
    folder = build_thinking_model(sp_tokenizer_dir, tmp_path_factory.mktemp("thinking_model"))
    service = make_service(folder, kv_cache_memory_gb=0.1)
    yield service
    service.frontend.engine.shutdown()


@pytest.fixture(scope="module")
def messages(chat: ChatEndpoint) -> MessagesEndpoint:
    return MessagesEndpoint(chat.frontend)


def refusal(endpoint: MessagesEndpoint, request: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(HTTPException) as caught:
        call(endpoint, request)
    assert caught.value.status_code == 400
    return caught.value.detail


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """The message less what differs between two runs of one request: ids, and how much
    of the prompt the prefix cache held."""
    blocks = [{k: v for k, v in b.items() if k != "id"} for b in message["content"]]
    usage = message["usage"]
    return {
        **{k: v for k, v in message.items() if k != "id"},
        "content": blocks,
        "usage": (usage["input_tokens"] + usage["cache_read_input_tokens"], usage["output_tokens"]),
    }


# --------------------------------------------------------------------------- validation

USER_IMAGE = {"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}
CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"city": "Oslo"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperatur": 0.5}, "temperatur", "Unknown field 'temperatur'"),
        ({"max_tokens": "12"}, "max_tokens", "expected an integer"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", '"user"'),
        ({"messages": [USER_IMAGE]}, "messages[0].content[0]", "is an image block"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0]",
            "is a document block",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "txt", "text": "x"}]}]},
            "messages[0].content[0]",
            '{"type": "text", "text": "..."}',
        ),
        ({"messages": [{"role": "user", "content": [CALL]}]}, "messages[0].content[0]", "user"),
        (
            {"messages": [{"role": "user", "content": [RESULT]}]},
            "messages[0].content[0].tool_use_id",
            "no earlier assistant message",
        ),
        (
            {"messages": [*ASK, {"role": "assistant", "content": [CALL]}]},
            "messages[1].content[0]",
            "prefill text only",
        ),
        ({"temperature": 2.5}, "temperature", "at most 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -1}, "top_k", "at least 0"),
        ({"stop_sequences": [""]}, "stop_sequences[0]", "at least 1 character"),
        ({"stop_sequences": "END"}, "stop_sequences", "expected an array"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens", "Missing required"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 12}},
            "thinking.budget_tokens",
            "less than 'max_tokens' (12)",
        ),
        ({"thinking": {"type": "sometimes"}}, "thinking", "expected"),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "declares no tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
            "tool_choice.name",
            "not a declared tool",
        ),
        (
            {"tools": [{**TOOLS[0], "name": "get weather"}]},
            "tools[0].name",
            "letters, digits",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].name", "unique"),
        (
            {"tools": [{**TOOLS[0], "input_schema": {"type": "string"}}]},
            "tools[0].input_schema",
            "must describe an object",
        ),
        ({"tools": [{"name": "x"}]}, "tools[0].input_schema", "Missing required"),
        (
            {"tools": [{**TOOLS[0], "type": "web_search_20250305"}]},
            "tools[0].type",
            '"custom"',
        ),
        (  # a server tool as Anthropic's docs write it: no input_schema
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
            "tools[0].type",
            '"custom"',
        ),
        (
            {"tools": [TOOLS[0], {"type": "bash_20250124", "name": "bash"}]},
            "tools[1].type",
            "server tools",
        ),
        ({"metadata": {"user_id": 7}}, "metadata.user_id", "expected a string or null"),
        ({"output_config": {"effort": "high"}}, "output_config.effort", "Unknown field"),
        (
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": 3}}}},
            "output_config.format.schema",
            "not a valid JSON Schema",
        ),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    messages: MessagesEndpoint, fields: dict[str, Any], param: str, words: str
) -> None:
    request = body(**fields)
    detail = refusal(messages, request)
    assert detail["param"] == param, detail
    assert words in detail["message"] and param in detail["message"], detail


FULL_BODY = body(
    system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    messages=[
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}, CALL]},
        {"role": "user", "content": [RESULT, {"type": "text", "text": "and?"}]},
    ],
    tools=TOOLS,
    tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    thinking={"type": "enabled", "budget_tokens": 4},
    stop_sequences=["x"],
    top_p=0.5,
    top_k=3,
    metadata={"user_id": "u"},
    output_config={"format": None},
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*path, i))
    return out


PATHS = _paths(FULL_BODY)[1:]


@settings(max_examples=150, deadline=None, database=None)
@given(where=st.sampled_from(PATHS), value=JSON_VALUES)
def test_any_value_anywhere_is_accepted_or_a_400(
    messages: MessagesEndpoint, where: tuple, value: Any
) -> None:
    request = copy.deepcopy(FULL_BODY)
    node = request
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    try:
        messages.prepare(request)
    except RequestError as exc:
        assert exc.status == 400 and exc.message


def test_a_prompt_longer_than_the_context_is_a_400_about_messages(
    messages: MessagesEndpoint,
) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    detail = refusal(messages, body(messages=long))
    assert detail["param"] == "messages" and "truncate_prompt_tokens" not in detail["message"]


def test_errors_take_anthropics_shape() -> None:
    response = anthropic_error(400, {"message": "'x' is bad", "code": "invalid_request"})
    assert response.status_code == 400
    assert json.loads(response.body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'x' is bad"},
    }
    overloaded = anthropic_error(
        503, {"message": "busy", "code": "overloaded"}, {"Retry-After": "1"}
    )
    assert overloaded.status_code == 529 and overloaded.headers["retry-after"] == "1"
    assert json.loads(overloaded.body)["error"]["type"] == "overloaded_error"
    assert json.loads(anthropic_error(504, {"message": "late"}).body)["error"]["type"] == (
        "timeout_error"
    )
    assert json.loads(anthropic_error(503, {"message": "dead"}).body)["error"]["type"] == (
        "api_error"
    )


def http_request(payload: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Request:
    """A POST /v1/messages as the Truss server hands it to the model."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": payload, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/messages",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
    }
    return Request(scope, receive)


def test_refusals_through_handle_take_anthropics_shape(messages: MessagesEndpoint) -> None:
    response = asyncio.run(messages.handle(http_request(b'{"model": "m"')))
    assert response.status_code == 400
    error = json.loads(response.body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in error["error"]["message"]
    late = http_request(json.dumps(body()).encode(), ((b"x-request-timeout", b"soon"),))
    response = asyncio.run(messages.handle(late))
    assert response.status_code == 400 and "x-request-timeout" in response.body.decode()


def test_an_overloaded_engine_is_a_529_overloaded_error(messages: MessagesEndpoint) -> None:
    engine = messages.frontend.engine
    saved, engine.max_queue_size = engine.max_queue_size, 0  # every request finds it full
    try:
        response = asyncio.run(messages.handle(http_request(json.dumps(body()).encode())))
    finally:
        engine.max_queue_size = saved
    assert response.status_code == 529 and response.headers["retry-after"] == "1"
    error = json.loads(response.body)["error"]
    assert error["type"] == "overloaded_error" and "overloaded" in error["message"]


# --------------------------------------------------------------------------- mapping


def test_a_conversation_maps_onto_chat_messages_in_order() -> None:
    conversation = [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "user", "content": [{"type": "text", "text": "Quickly.", "cache_control": None}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Two calls.", "signature": "s"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking."},
                CALL,
                {**CALL, "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                RESULT,
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "is_error": True,
                    "content": [{"type": "text", "text": "no data"}],
                },
                {"type": "text", "text": "Well?"},
            ],
        },
    ]
    system = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    assert chat_messages(system, conversation) == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Weather and time in Oslo?\nQuickly."},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Two calls.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": TOOL_ERROR_PREFIX + "no data"},
        {"role": "user", "content": "Well?"},
    ]


def test_the_prompt_is_chats_prompt_for_the_same_conversation(
    chat: ChatEndpoint, messages: MessagesEndpoint
) -> None:
    conversation = [
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": [CALL]},
        {"role": "user", "content": [RESULT]},
    ]
    prepared = messages.prepare(
        body(messages=conversation, system="Be brief.", tools=TOOLS, thinking=None)
    )
    openai = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Time in Oslo?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
            ],
            "tools": [
                {"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
                for t in TOOLS
            ],
        }
    )  # fmt: skip
    expected = render_prompt(chat.frontend.tokenizer, openai)
    assert chat.frontend.tokenizer.decode(prepared.generation.prompt_ids) == (
        chat.frontend.tokenizer.decode(chat.frontend.tokenize(expected, openai, "messages"))
    )
    assert "<tool_response>\n12:00\n</tool_response>" in expected
    assert expected.endswith("<|im_start|>assistant\n<think>\n")  # the template's default


def test_sampling_fields_reach_the_engines_params(messages: MessagesEndpoint) -> None:
    prepared = messages.prepare(
        body(
            temperature=0.7,
            top_p=0.5,
            top_k=3,
            max_tokens=40,
            stop_sequences=["END", "STOP"],
            metadata={"user_id": "user-7"},
            tools=TOOLS,
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
    )
    params, options = prepared.generation.params, prepared.generation.options
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (
        0.7,
        0.5,
        3,
        40,
    )
    assert options.stop_strings == ["END", "STOP"] and options.user == "user-7"
    assert prepared.generation.parsing.max_calls == 1  # disable_parallel_tool_use
    assert prepared.generation.parsing.tool_names == {"get_weather", "get_time"}


def test_thinking_switches_the_templates_enable_thinking(messages: MessagesEndpoint) -> None:
    def prompt(thinking: dict[str, Any] | None) -> str:
        prepared = messages.prepare(body(thinking=thinking))
        return messages.frontend.tokenizer.decode(prepared.generation.prompt_ids)

    assert prompt({"type": "disabled"}).endswith("<think>\n\n</think>\n\n")
    assert prompt({"type": "enabled", "budget_tokens": 8}).endswith("assistant\n<think>\n")
    assert prompt({"type": "adaptive"}).endswith("assistant\n<think>\n")


def test_same_tokens_as_chat_for_the_same_conversation(
    chat: ChatEndpoint, messages: MessagesEndpoint
) -> None:
    settings = {"max_tokens": 10, "temperature": 0, "top_p": 0.9, "top_k": 20}
    anthropic = body(system="Be brief.", stop_sequences=["zzz"], **settings)
    openai = {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, *ASK],
        "stop": ["zzz"],
        "chat_template_args": {"enable_thinking": False},
        **settings,
    }
    with recorded_tokens(chat) as produced:
        answer_text = call(messages, anthropic)["content"][0]["text"]
        chat_text = call(chat, openai)["choices"][0]["message"]["content"]
    ids = [tokens for rid, tokens in produced.items()]
    assert len(ids) == 2 and len(ids[0]) == 10 and ids[0] == ids[1]
    assert answer_text == chat_text


# --------------------------------------------------------------------------- responses


def test_a_text_reply_streamed_and_not(messages: MessagesEndpoint) -> None:
    whole = call(messages, body(metadata={"user_id": "u-1"}))
    assert whole["id"].startswith("msg_") and whole["type"] == "message"
    assert whole["role"] == "assistant" and whole["model"] == "m"
    assert [block["type"] for block in whole["content"]] == ["text"]
    assert whole["stop_reason"] == "max_tokens" and whole["stop_sequence"] is None
    usage = whole["usage"]
    assert usage["output_tokens"] == 12
    prompt_len = len(messages.prepare(body()).generation.prompt_ids)
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt_len
    events = call(messages, body(stream=True))
    assert without_ids(streamed_message(events)) == without_ids(whole)


def test_a_stop_sequence_ends_the_reply(messages: MessagesEndpoint) -> None:
    text = call(messages, body())["content"][0]["text"]
    # Three characters that first occur past the start, so some text comes before them.
    stop = next(text[i : i + 3] for i in range(1, len(text) - 3) if text.index(text[i : i + 3]) > 0)
    whole = call(messages, body(stop_sequences=["never-there", stop]))
    assert whole["stop_reason"] == "stop_sequence" and whole["stop_sequence"] == stop
    assert whole["content"] == [{"type": "text", "text": text[: text.index(stop)]}]
    streamed = streamed_message(call(messages, body(stop_sequences=[stop], stream=True)))
    assert (streamed["stop_reason"], streamed["stop_sequence"]) == ("stop_sequence", stop)


def test_a_forced_tool_call_and_the_round_trip(messages: MessagesEndpoint) -> None:
    # The random model spells the call's markup out in bytes: ~60 tokens.
    ask = body(tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=150)
    whole = call(messages, ask)
    assert whole["stop_reason"] == "tool_use"
    (block,) = whole["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert block["name"] == "get_weather"
    jsonschema.validate(block["input"], TOOLS[0]["input_schema"])
    streamed = streamed_message(call(messages, {**ask, "stream": True}))
    assert without_ids(streamed) == without_ids(whole)

    history = [
        *ASK,
        {"role": "assistant", "content": whole["content"]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "18 C"}],
        },
    ]
    follow_up = body(messages=history, tools=TOOLS, max_tokens=6)
    prompt = messages.frontend.tokenizer.decode(messages.prepare(follow_up).generation.prompt_ids)
    assert (
        json.dumps(block["input"]) in prompt and "<tool_response>\n18 C\n</tool_response>" in prompt
    )
    reply = call(messages, follow_up)
    assert reply["stop_reason"] in ("max_tokens", "end_turn", "tool_use")


def test_any_tool_and_disable_parallel_tool_use(messages: MessagesEndpoint) -> None:
    ask = body(
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=150,
        messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
    )
    whole = call(messages, ask)
    assert whole["stop_reason"] == "tool_use"
    assert [block["type"] for block in whole["content"]] == ["tool_use"]


def test_tool_choice_none_hides_the_tools(messages: MessagesEndpoint) -> None:
    prepared = messages.prepare(body(tools=TOOLS, tool_choice={"type": "none"}))
    assert "get_weather" not in messages.frontend.tokenizer.decode(prepared.generation.prompt_ids)
    assert call(messages, body(tools=TOOLS, tool_choice={"type": "none"}))["content"][0][
        "type"
    ] == ("text")


def test_thinking_comes_back_as_a_signed_thinking_block(messages: MessagesEndpoint) -> None:
    ask = body(thinking={"type": "adaptive"}, max_tokens=8)
    whole = call(messages, ask)
    (block,) = whole["content"]  # the random model never closes its block in 8 tokens
    assert block["type"] == "thinking" and block["thinking"]
    assert block["signature"] == thinking_signature(block["thinking"])
    assert whole["stop_reason"] == "max_tokens"
    events = call(messages, {**ask, "stream": True})
    deltas = [data["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert deltas[-1] == "signature_delta" and set(deltas[:-1]) == {"thinking_delta"}
    assert streamed_message(events)["content"] == whole["content"]

    omitted = call(messages, {**ask, "thinking": {"type": "adaptive", "display": "omitted"}})
    assert omitted["content"] == [{**block, "thinking": ""}]


def test_budget_tokens_caps_the_thinking_then_the_answer_follows(
    chat: ChatEndpoint, messages: MessagesEndpoint
) -> None:
    ask = body(thinking={"type": "enabled", "budget_tokens": 6}, max_tokens=20)
    with recorded_tokens(chat) as produced:
        whole = call(messages, ask)
    # The random model never closes its block itself: the budget did, after 6 tokens.
    thinking, answer = whole["content"]
    assert thinking["type"] == "thinking" and answer["type"] == "text" and answer["text"]
    (first_id, thought), (second_id, answered) = produced.items()
    assert second_id == first_id + "-answer" and len(thought) >= 6
    tokenizer = messages.frontend.tokenizer
    assert thinking["thinking"] == tokenizer.decode(thought[:6], skip_special_tokens=True).strip()
    assert answer["text"] == tokenizer.decode(answered, skip_special_tokens=True).strip()
    # 6 thinking tokens, the end tag, then the answer in what max_tokens leaves.
    assert len(answered) == 20 - 6 - 1 and whole["usage"]["output_tokens"] == 20
    assert whole["stop_reason"] == "max_tokens"
    streamed = streamed_message(call(messages, {**ask, "stream": True}))
    assert without_ids(streamed) == without_ids(whole)


def test_budget_tokens_then_a_forced_tool_call(messages: MessagesEndpoint) -> None:
    ask = body(
        thinking={"type": "enabled", "budget_tokens": 5},
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
        max_tokens=150,
    )
    whole = call(messages, ask)
    assert [block["type"] for block in whole["content"]] == ["thinking", "tool_use"]
    assert whole["stop_reason"] == "tool_use"
    jsonschema.validate(whole["content"][1]["input"], TOOLS[1]["input_schema"])


def test_a_budget_that_leaves_no_room_ends_with_the_thinking(messages: MessagesEndpoint) -> None:
    whole = call(messages, body(thinking={"type": "enabled", "budget_tokens": 11}))
    free = call(messages, body(thinking={"type": "adaptive"}))
    # 11 thinking tokens and the end tag fill max_tokens (12): no answer, no continuation.
    assert [block["type"] for block in whole["content"]] == ["thinking"]
    assert free["content"][0]["thinking"].startswith(whole["content"][0]["thinking"])
    assert whole["stop_reason"] == "max_tokens" and whole["usage"]["output_tokens"] == 12


def test_one_token_each_keeps_the_finish_on_the_last() -> None:
    out = SequenceOutput("r", [5, 6, 7], True, "stop", 7, None, 10, 4)
    parts = one_token_each(out)
    assert [p.new_token_ids for p in parts] == [[5], [6], [7]]
    assert [(p.finished, p.finish_reason, p.stop_reason) for p in parts] == [
        (False, None, None),
        (False, None, None),
        (True, "stop", 7),
    ]
    assert all((p.num_prompt_tokens, p.num_cached_tokens) == (10, 4) for p in parts)


def test_a_final_assistant_message_is_a_prefill(messages: MessagesEndpoint) -> None:
    prefill = [*ASK, {"role": "assistant", "content": "It is"}]
    prepared = messages.prepare(body(messages=prefill))
    # Continuing a message adds no generation prompt (nor this template's thinking block).
    assert messages.frontend.tokenizer.decode(prepared.generation.prompt_ids).endswith(
        "<|im_start|>assistant\nIt is"
    )
    reply = call(messages, body(messages=prefill))
    assert not reply["content"][0]["text"].startswith("It is")


def test_structured_output_from_output_config(messages: MessagesEndpoint) -> None:
    schema = TOOLS[0]["input_schema"]
    whole = call(
        messages,
        body(output_config={"format": {"type": "json_schema", "schema": schema}}, max_tokens=150),
    )
    assert whole["stop_reason"] == "end_turn"
    jsonschema.validate(json.loads(whole["content"][0]["text"]), schema)


def test_a_reply_cut_by_the_context_says_so(messages: MessagesEndpoint) -> None:
    frontend = messages.frontend
    words = 1
    room = frontend.max_model_len - len(messages.prepare(body()).generation.prompt_ids)
    # Fill the context up to 4 tokens ("x" is one token after a space here).
    while True:
        ask = [{"role": "user", "content": "What is the weather in Paris?" + " x" * words}]
        left = frontend.max_model_len - len(
            messages.prepare(body(messages=ask)).generation.prompt_ids
        )
        if left <= 4:
            break
        words += max(1, left - 4)
    assert 0 < left <= 4 < room
    whole = call(messages, body(messages=ask, max_tokens=50))
    assert whole["stop_reason"] == "model_context_window_exceeded"
    assert whole["usage"]["output_tokens"] == left


# --------------------------------------------------------------------------- stream


async def _slow(pieces, delay: float):
    async for piece in pieces:
        await asyncio.sleep(delay)
        yield piece


def test_pings_fill_gaps_in_the_output(messages: MessagesEndpoint) -> None:
    async def run() -> list[tuple[str, dict[str, Any]]]:
        # Long enough that the engine is still at it when the first piece arrives.
        prepared = messages.prepare(body(max_tokens=100))
        pieces = messages.frontend.generate(prepared.generation)
        first = await anext(pieces)
        out = []
        async for raw in stream_events(prepared, first, _slow(pieces, 0.1), "m", 0.02):
            out.append(raw.decode())
        return parse_events("".join(out))

    events = asyncio.run(run())
    names = [name for name, _ in events]
    assert names.count("ping") >= 2  # while each later token was held back
    assert names.index("ping") > names.index("content_block_delta")
    assert names[-2:] == ["message_delta", "message_stop"]
    assert streamed_message(events)["usage"]["output_tokens"] == 100


def test_a_client_leaving_during_a_gap_ends_the_engine_request(
    messages: MessagesEndpoint,
) -> None:
    engine = messages.frontend.engine.engine

    async def run() -> None:
        prepared = messages.prepare(body(max_tokens=500))
        pieces = messages.frontend.generate(prepared.generation)
        first = await anext(pieces)
        events = stream_events(prepared, first, _slow(pieces, 5.0), "m", 0.01)
        seen = []
        async for raw in events:
            seen.append(raw.decode())
            if "ping" in raw.decode():
                break
        await events.aclose()  # what the response does when the client is gone

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_work()
    assert not any(engine.block_manager.ref_counts)
