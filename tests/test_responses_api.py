"""/v1/responses in process: the request mapped onto the shared path, output items, the
event stream, the store behind previous_response_id, and every refusal naming its field.

The endpoint runs over the embedded model (Mistral-format tools, no reasoning) and, for
thinking, over the tiny Qwen3-style "hermes" model (tests/tool_models.py). The SDK's view
of the same endpoint through the real server is in test_responses_openai.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from fastapi import HTTPException

from flashserve.api.endpoints.base import first_or_error
from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.responses import ResponsesEndpoint
from flashserve.api.endpoints.responses_format import PreparedResponse
from flashserve.api.endpoints.responses_store import ResponseStore
from flashserve.engine.structured import EBNF, GrammarSpec
from tests.chat_harness import call, make_service, recorded_tokens
from tests.tool_calling_cases import SCHEMAS, TOOLS

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]

FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
ASK = "What is the weather in Paris?"
STORY = "Tell me a story."


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatEndpoint]:
    service = make_service()
    yield service
    service.frontend.engine.shutdown()


@pytest.fixture(scope="module")
def responses(chat: ChatEndpoint) -> ResponsesEndpoint:
    return ResponsesEndpoint(chat.frontend)


def parse_events(raw: str) -> list[dict[str, Any]]:
    """SSE text -> the events' JSON, checking each `event:` line names its data's type."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


async def _answer(endpoint: ResponsesEndpoint, body: dict[str, Any]) -> Any:
    response = await endpoint.create(body)
    if isinstance(response, dict):
        return response
    chunks = [c.decode() if isinstance(c, bytes) else c async for c in response.body_iterator]
    return parse_events("".join(chunks))


def answer(endpoint: ResponsesEndpoint, body: dict[str, Any]) -> Any:
    """The response body, or for a stream its events."""
    return asyncio.run(_answer(endpoint, body))


def refusal(endpoint: ResponsesEndpoint, body: Any) -> dict[str, Any]:
    """The error object of a refused request (asserting it is a 400)."""
    with pytest.raises(HTTPException) as caught:
        answer(endpoint, body)
    assert caught.value.status_code == 400, caught.value.detail
    return caught.value.detail


def output_text(body: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in body["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def final(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1]["response"]


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    """A response with its generated ids and times blanked, to compare two runs."""
    text = json.dumps(body)
    for item in body["output"]:
        text = text.replace(item["id"], "ID")
        if "call_id" in item:
            text = text.replace(item["call_id"], "CALL")
    out = json.loads(text.replace(body["id"], "RESP"))
    out["created_at"] = out["completed_at"] = 0
    # Prefix caching: a repeat of the same prompt finds it cached.
    out["usage"]["input_tokens_details"]["cached_tokens"] = 0
    return out


# --------------------------------------------------------------------------- output


def test_plain_text_is_one_message_item(responses: ResponsesEndpoint) -> None:
    body = answer(responses, {"input": STORY, "max_output_tokens": 8, "temperature": 1, "seed": 3})
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["id"].startswith("msg_") and item["status"] == "incomplete"
    [part] = item["content"]
    assert part == {"type": "output_text", "text": part["text"], "annotations": []}
    assert part["text"]
    usage = body["usage"]
    assert usage["output_tokens"] == 8 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert body["max_output_tokens"] == 8 and body["temperature"] == 1.0
    assert body["model"] == "m" and body["store"] is True and body["error"] is None


def test_same_tokens_as_chat(chat: ChatEndpoint, responses: ResponsesEndpoint) -> None:
    sampling = {"temperature": 1, "top_p": 0.9, "seed": 7}
    instructions = "Answer in French."
    chat_body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": instructions},
            {"role": "user", "content": STORY},
        ],
        "max_tokens": 16,
        **sampling,
    }
    request = {"instructions": instructions, "input": STORY, "max_output_tokens": 16, **sampling}
    with recorded_tokens(chat) as produced:
        via_chat = call(chat, chat_body)
        via_responses = answer(responses, request)
    assert produced[via_chat["id"]] == produced[via_responses["id"]]
    assert len(produced[via_chat["id"]]) == 16
    assert output_text(via_responses) == via_chat["choices"][0]["message"]["content"]
    assert via_responses["usage"]["input_tokens"] == via_chat["usage"]["prompt_tokens"]


def test_stream_events_in_order_and_equal_to_the_body(responses: ResponsesEndpoint) -> None:
    request = {"input": STORY, "max_output_tokens": 10, "temperature": 1, "seed": 4}
    whole = answer(responses, request)
    events = answer(responses, {**request, "stream": True})
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == [] and events[0]["response"]["usage"] is None
    item_id = events[2]["item"]["id"]
    assert all(e.get("item_id", item_id) == item_id for e in events[3:-1])
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-4]["text"] == output_text(whole)
    assert events[-2]["item"] == final(events)["output"][0]
    assert without_ids(final(events)) == without_ids(whole)


def test_a_blank_answer_is_still_one_message(
    chat: ChatEndpoint, responses: ResponsesEndpoint
) -> None:
    # Greedy, the embedded model writes nothing visible: chat's content is blank here.
    content = call(chat, {"model": "m", "messages": [{"role": "user", "content": STORY}],
                          "max_tokens": 8, "temperature": 0})["choices"][0]["message"]["content"]  # fmt: skip
    assert not content.strip()
    body = answer(responses, {"input": STORY, "max_output_tokens": 8, "temperature": 0})
    assert [item["type"] for item in body["output"]] == ["message"]
    assert output_text(body) == content


def test_forced_calls_are_function_call_items(responses: ResponsesEndpoint) -> None:
    request = {
        "input": ASK,
        "tools": FLAT_TOOLS,
        "tool_choice": "required",
        "max_output_tokens": 300,
        "temperature": 1,
        "seed": 11,
    }
    whole = answer(responses, request)
    assert whole["status"] == "completed"
    calls = whole["output"]
    assert calls and all(item["type"] == "function_call" for item in calls)
    for item in calls:
        assert item["id"].startswith("fc_") and item["call_id"].startswith("call_")
        assert item["status"] == "completed"
        jsonschema.validate(json.loads(item["arguments"]), SCHEMAS[item["name"]])
    assert whole["tools"][0]["name"] == "get_weather" and whole["tool_choice"] == "required"

    events = answer(responses, {**request, "stream": True})
    assert without_ids(final(events)) == without_ids(whole)
    for index, item in enumerate(final(events)["output"]):
        mine = [e for e in events if e.get("output_index") == index]
        kinds = [e["type"] for e in mine]
        assert kinds[0] == "response.output_item.added"
        assert mine[0]["item"]["arguments"] == "" and mine[0]["item"]["name"] == item["name"]
        assert kinds[-2:] == ["response.function_call_arguments.done", "response.output_item.done"]
        assert set(kinds[1:-2]) <= {"response.function_call_arguments.delta"}
        joined = "".join(e["delta"] for e in mine[1:-2])
        assert joined == mine[-2]["arguments"] == item["arguments"]


def test_named_tool_choice_and_no_parallel_calls(responses: ResponsesEndpoint) -> None:
    base = {"input": ASK, "tools": FLAT_TOOLS, "max_output_tokens": 300, "temperature": 1}
    named = answer(
        responses, {**base, "seed": 2, "tool_choice": {"type": "function", "name": "add"}}
    )
    assert [item["name"] for item in named["output"]] == ["add"]
    single = answer(responses, {**base, "seed": 11, "tool_choice": "required",
                                "parallel_tool_calls": False})  # fmt: skip
    assert len(single["output"]) == 1 and single["parallel_tool_calls"] is False


def test_allowed_tools_limit_the_calls(responses: ResponsesEndpoint) -> None:
    choice = {"type": "allowed_tools", "mode": "required",
              "tools": [{"type": "function", "name": "add"}]}  # fmt: skip
    body = answer(
        responses,
        {"input": ASK, "tools": FLAT_TOOLS, "tool_choice": choice, "max_output_tokens": 300,
         "temperature": 1, "seed": 11},
    )  # fmt: skip
    assert body["output"] and {item["name"] for item in body["output"]} == {"add"}
    assert body["tool_choice"] == choice and len(body["tools"]) == len(FLAT_TOOLS)


def test_function_call_output_round_trip(responses: ResponsesEndpoint) -> None:
    first = answer(
        responses,
        {
            "input": ASK,
            "tools": FLAT_TOOLS,
            "tool_choice": {"type": "function", "name": "get_weather"},
            "max_output_tokens": 200,
            "temperature": 1,
            "seed": 5,
        },
    )
    [call_item] = first["output"]
    result = {"type": "function_call_output", "call_id": call_item["call_id"], "output": "18C"}
    follow = {"tools": FLAT_TOOLS, "max_output_tokens": 6, "temperature": 1, "seed": 5}
    explicit = {**follow, "input": [{"role": "user", "content": ASK}, call_item, result]}
    chained = {**follow, "input": [result], "previous_response_id": first["id"]}
    # The stored conversation renders the same prompt as the items sent back in full.
    sent = responses.prepare(explicit).generation
    stored = responses.prepare(chained).generation
    assert sent.prompt_ids == stored.prompt_ids
    prompt = responses.frontend.tokenizer.decode(sent.prompt_ids)
    assert "[TOOL_CALLS]" in prompt and "18C" in prompt and call_item["arguments"] in prompt
    reply = answer(responses, chained)
    assert reply["previous_response_id"] == first["id"]
    assert [item["type"] for item in reply["output"]] == ["message"]


def test_instructions_are_not_carried_over(responses: ResponsesEndpoint) -> None:
    first = answer(responses, {"instructions": "Be brief.", "input": "Hi", "max_output_tokens": 2})
    follow = {"input": "And then?", "previous_response_id": first["id"], "max_output_tokens": 2}
    prompt = responses.frontend.tokenizer.decode(responses.prepare(follow).generation.prompt_ids)
    assert "Hi" in prompt and "And then?" in prompt and "Be brief." not in prompt
    assert output_text(first) in prompt


def test_store_false_and_unknown_ids(responses: ResponsesEndpoint) -> None:
    kept = answer(responses, {"input": "Hi", "max_output_tokens": 2, "store": False})
    assert kept["store"] is False and kept["id"] not in responses.store
    for missing in (kept["id"], "resp_nope"):
        error = refusal(
            responses, {"input": "x", "previous_response_id": missing, "max_output_tokens": 2}
        )
        assert error["param"] == "previous_response_id"
        assert error["code"] == "previous_response_not_found" and missing in error["message"]


def test_streamed_responses_are_stored(responses: ResponsesEndpoint) -> None:
    events = answer(responses, {"input": "Hi", "max_output_tokens": 3, "stream": True})
    stored = responses.store.get(final(events)["id"])
    assert stored is not None
    assert stored.items[0] == {"type": "message", "role": "user", "content": "Hi"}
    assert list(stored.items[1:]) == final(events)["output"]


def test_store_is_bounded() -> None:
    store = ResponseStore(max_entries=2, max_chars=200)
    item = {"type": "message", "role": "user", "content": "x" * 50}
    for name in ("a", "b", "c"):
        assert store.put(name, [item])
    assert "a" not in store and "b" in store and "c" in store
    store.get("b")  # recently used: "c" goes first now
    assert store.put("d", [item])
    assert "b" in store and "c" not in store
    assert store.put("e", [item, item])  # 2 x ~80 chars: only this one fits
    assert len(store) == 1 and "e" in store
    assert not store.put("f", [item] * 4) and "f" not in store  # alone over the limit


def test_truncation_auto_keeps_the_longest_tail_that_fits(responses: ResponsesEndpoint) -> None:
    turns: list[dict[str, Any]] = []
    for n in range(40):
        turns.append({"role": "user", "content": f"Question {n}: " + "tell me more " * 10})
        turns.append({"role": "assistant", "content": f"Answer {n}: " + "it is so " * 10})
    rules = {"role": "developer", "content": "Stay on topic."}
    body = {
        "instructions": "Be brief.",
        "input": [rules, *turns, {"role": "user", "content": "Last question?"}],
        "max_output_tokens": 50,
    }
    error = refusal(responses, body)  # truncation "disabled", the default
    assert error["param"] == "input" and error["code"] == "context_length_exceeded"

    fitted = responses.prepare({**body, "truncation": "auto"})
    limit = responses.frontend.max_model_len
    assert len(fitted.generation.prompt_ids) + 50 <= limit
    prompt = responses.frontend.tokenizer.decode(fitted.generation.prompt_ids)
    assert "Be brief." in prompt and "Stay on topic." in prompt and "Last question?" in prompt
    first = next(n for n in range(40) if f"Question {n}:" in prompt)
    assert first > 0 and f"Answer {first - 1}:" not in prompt
    # The longest tail: from one turn earlier the prompt would not fit.
    longer = {**body, "input": [rules, *turns[2 * (first - 1) :], body["input"][-1]]}
    assert len(responses.prepare(longer).generation.prompt_ids) + 50 > limit
    # What is stored is the conversation the model saw.
    assert fitted.items[0] == {"type": "message", **rules}
    assert fitted.items[1]["content"].startswith(f"Question {first}:")

    reply = answer(responses, {**body, "truncation": "auto", "max_output_tokens": 2})
    assert reply["truncation"] == "auto" and reply["status"] in ("completed", "incomplete")


def test_context_refusal_names_the_responses_remedy(responses: ResponsesEndpoint) -> None:
    """Too long an input points at this API's `truncation`, not chat's truncate_prompt_tokens
    (a field this endpoint refuses); with truncation "auto" already on, it says the last
    turn alone is too long."""
    body = {"input": "word " * 1500, "max_output_tokens": 5}
    error = refusal(responses, body)
    assert error["param"] == "input" and error["code"] == "context_length_exceeded"
    assert "truncate_prompt_tokens" not in error["message"]
    assert "truncation" in error["message"] and '"auto"' in error["message"]
    error = refusal(responses, {**body, "truncation": "auto"})
    assert error["code"] == "context_length_exceeded"
    assert "truncate_prompt_tokens" not in error["message"]
    assert "last user turn" in error["message"]


def test_json_schema_and_json_object(responses: ResponsesEndpoint) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}
    body = answer(
        responses,
        {"input": "Plan a trip.", "text": {"format": fmt}, "max_output_tokens": 60, "seed": 1},
    )
    assert body["status"] == "completed" and body["text"] == {"format": fmt}
    jsonschema.validate(json.loads(output_text(body)), schema)
    loose = answer(
        responses,
        {"input": "JSON please.", "text": {"format": {"type": "json_object"}},
         "max_output_tokens": 60, "seed": 2, "temperature": 0.5},
    )  # fmt: skip
    if loose["status"] == "completed":
        assert isinstance(json.loads(output_text(loose)), dict)
    else:
        assert output_text(loose).startswith("{")


def test_logprobs_included(responses: ResponsesEndpoint) -> None:
    request = {
        "input": STORY,
        "max_output_tokens": 5,
        "temperature": 1,
        "seed": 9,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
    }
    body = answer(responses, request)
    part = body["output"][0]["content"][0]
    assert len(part["logprobs"]) == 5
    assert all(len(entry["top_logprobs"]) == 2 for entry in part["logprobs"])
    assert "".join(entry["token"] for entry in part["logprobs"]).strip() == part["text"].strip()
    events = answer(responses, {**request, "stream": True})
    streamed = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [lp for e in streamed for lp in e["logprobs"]] == part["logprobs"]


def test_metadata_user_and_sampling_are_echoed(responses: ResponsesEndpoint) -> None:
    body = answer(
        responses,
        {"input": "Hi", "max_output_tokens": 2, "metadata": {"team": "a"}, "user": "u1",
         "top_p": 0.5, "temperature": 0.7, "reasoning": {"effort": "low"}},
    )  # fmt: skip
    assert body["metadata"] == {"team": "a"} and body["user"] == "u1"
    assert body["top_p"] == 0.5 and body["temperature"] == pytest.approx(0.7)
    assert body["reasoning"] == {"effort": "low", "summary": None}


# --------------------------------------------------------------------------- reasoning


def forced(endpoint: ResponsesEndpoint, body: dict[str, Any], text: str) -> Any:
    """The endpoint's answer with the model's output forced to `text` (a grammar on the
    prepared request), so the random tiny model writes a reasoning block."""

    async def run() -> Any:
        prepared: PreparedResponse = endpoint.prepare(body)
        spec = GrammarSpec(EBNF, f"root ::= {json.dumps(text)}")
        prepared.generation.params.grammar = endpoint.frontend.structured.compile(spec)
        pieces = endpoint.frontend.generate(prepared.generation)
        first = await first_or_error(pieces)
        response = await endpoint.respond(prepared, first, pieces, None)
        if isinstance(response, dict):
            return response
        chunks = [c.decode() if isinstance(c, bytes) else c async for c in response.body_iterator]
        return parse_events("".join(chunks))

    return asyncio.run(run())


def test_reasoning_effort_switches_thinking(services) -> None:
    hermes = ResponsesEndpoint(services("hermes").frontend)

    def prompt(**fields: Any) -> str:
        generation = hermes.prepare({"input": "Is 7 prime?", **fields}).generation
        return hermes.frontend.tokenizer.decode(generation.prompt_ids)

    for effort in ("none", "minimal"):
        assert prompt(reasoning={"effort": effort}).endswith("<think>\n\n</think>\n\n")
    for effort in ("low", "medium", "high"):
        assert prompt(reasoning={"effort": effort}).endswith("<|im_start|>assistant\n")
    assert prompt().endswith("<|im_start|>assistant\n")  # the model's default: thinking


def test_reasoning_item_then_message(services) -> None:
    hermes = ResponsesEndpoint(services("hermes").frontend)
    text = "<think>\nSeven has no divisors.\n</think>\n\nYes."
    body = {"input": "Is 7 prime?", "max_output_tokens": 100, "temperature": 1, "seed": 5}
    whole = forced(hermes, body, text)
    reasoning, message = whole["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Seven has no divisors."}]
    assert output_text(whole) == "Yes." and message["status"] == "completed"
    usage = whole["usage"]
    assert 0 < usage["output_tokens_details"]["reasoning_tokens"] < usage["output_tokens"]

    events = forced(hermes, {**body, "stream": True}, text)
    kinds = [e["type"] for e in events]
    thinking = kinds.count("response.reasoning_text.delta")
    answering = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * thinking,
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * answering,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert without_ids(final(events)) == without_ids(whole)

    # Sent back, the reasoning is the assistant turn's reasoning_content for the template.
    follow = {"input": [{"role": "user", "content": "Is 7 prime?"}, *whole["output"]]}
    sent_back = hermes.prepare(follow).generation.prompt_ids
    prompt = hermes.frontend.tokenizer.decode(sent_back)
    assert "<think>\nSeven has no divisors.\n</think>\n\nYes.<|im_end|>" in prompt

    # include reasoning.encrypted_content: a client that keeps no state sends only that.
    sealed = forced(hermes, {**body, "include": ["reasoning.encrypted_content"]}, text)
    reasoning = sealed["output"][0]
    assert reasoning["encrypted_content"] and reasoning["content"] == whole["output"][0]["content"]
    opaque = {
        "type": "reasoning",
        "summary": [],
        "encrypted_content": reasoning["encrypted_content"],
    }
    follow = {"input": [{"role": "user", "content": "Is 7 prime?"}, opaque, sealed["output"][1]]}
    assert hermes.prepare(follow).generation.prompt_ids == sent_back


# --------------------------------------------------------------------------- refusals

REFUSED = [
    ({"input": "x", "temprature": 1}, "temprature"),
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "top_p": 0}, "top_p"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
        "input[0].content[0]",
    ),
    (
        {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]},
        "input[0].encrypted_content",
    ),
    (
        {
            "input": [
                {"role": "user", "content": "x"},
                {"type": "function_call_output", "call_id": "call_9", "output": "1"},
            ]
        },
        "input[1].call_id",
    ),  # fmt: skip
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    ({"input": "x", "tools": TOOLS}, "tools[0].function"),
    (
        {
            "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}],
        },
        "tools[0].parameters",
    ),
    (
        {"input": "x", "tools": [{"type": "function", "name": "f", "extra": 1}]},
        "tools[0].extra",
    ),
    (
        {"input": "x", "tools": FLAT_TOOLS, "tool_choice": {"type": "function", "name": "nope"}},
        "tool_choice.name",
    ),
    ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    (
        {
            "input": "x",
            "tools": FLAT_TOOLS,
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "nope"}],
            },
        },
        "tool_choice.tools[0].name",
    ),  # fmt: skip
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    (
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format.schema",
    ),
    (
        {
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "wrong"}}},
        },
        "text.format.schema",
    ),  # fmt: skip
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include[0]"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"input": "x", "stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"input": "x" * 200_000}, "input"),
]


@pytest.mark.parametrize(("body", "param"), REFUSED, ids=[param for _, param in REFUSED])
def test_refusals_name_the_field(responses: ResponsesEndpoint, body: dict, param: str) -> None:
    error = refusal(responses, body)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in error["message"]


@pytest.mark.parametrize(
    "items",
    [
        [{"type": ["message"], "role": "user", "content": "x"}],
        [{"type": {"type": "x"}, "call_id": "c", "output": "1"}],
        [{"role": "user", "content": [{"type": ["input_text"], "text": "x"}]}],
        [{"role": "user", "content": [{"type": {}, "text": "x"}]}],
    ],
)
def test_a_type_that_is_not_a_string_is_a_400(responses: ResponsesEndpoint, items: list) -> None:
    """An item's or a part's `type` of the wrong JSON type is refused, never a 500 (it was
    looked up in a set of names before the schema check)."""
    error = refusal(responses, {"input": items})
    assert error["param"].startswith("input[0]"), error


def test_a_body_that_is_not_an_object(responses: ResponsesEndpoint) -> None:
    error = refusal(responses, ["input"])
    assert error["param"] is None and "JSON object" in error["message"]
