"""/v1/messages in process: the mapping onto chat's prompt, content blocks, stop reasons,
the event stream, pings and disconnects, on a tiny thinking tool-calling model
(tests/messages_support.py). Validation: tests/test_messages_validation.py; the official
SDK against the real Truss server: tests/test_messages_sdk.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jsonschema

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.messages import MessagesEndpoint
from flashserve.api.endpoints.messages_format import stream_events, thinking_signature
from flashserve.api.endpoints.messages_protocol import TOOL_ERROR_PREFIX, chat_messages
from flashserve.api.frontend.prompt import render_prompt
from flashserve.engine.sequence import SequenceOutput
from tests.chat_harness import recorded_tokens
from tests.messages_support import (
    ASK,
    CALL,
    RESULT,
    TOOLS,
    body,
    call,
    parse_events,
    streamed_message,
    without_ids,
)

pytest_plugins = ["tests.tokenizer_fixtures", "tests.messages_fixtures"]


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
    parts = out.one_token_each()
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
