"""/v1/responses in process: the request mapped onto the shared path, output items, the
event stream and the store behind previous_response_id.

The endpoint runs over the embedded model (Mistral-format tools, no reasoning,
tests/responses_fixtures.py); thinking is tests/test_responses_reasoning.py, refusals
tests/test_responses_validation.py. The SDK's view of the same endpoint through the real
server is in test_responses_openai.py.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from flashserve.api.endpoints.chat import ChatEndpoint
from flashserve.api.endpoints.responses import ResponsesEndpoint
from flashserve.api.endpoints.responses_store import ResponseStore
from tests.chat_harness import call, recorded_tokens
from tests.responses_support import (
    ASK,
    FLAT_TOOLS,
    STORY,
    answer,
    final,
    output_text,
    refusal,
    without_ids,
)
from tests.tool_calling_cases import SCHEMAS

pytest_plugins = ["tests.responses_fixtures"]


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


def test_same_tokens_as_chat(embedded_chat: ChatEndpoint, responses: ResponsesEndpoint) -> None:
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
    with recorded_tokens(embedded_chat) as produced:
        via_chat = call(embedded_chat, chat_body)
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
    embedded_chat: ChatEndpoint, responses: ResponsesEndpoint
) -> None:
    # Greedy, the embedded model writes nothing visible: chat's content is blank here.
    asked = {"model": "m", "messages": [{"role": "user", "content": STORY}]}
    reply = call(embedded_chat, {**asked, "max_tokens": 8, "temperature": 0})
    content = reply["choices"][0]["message"]["content"]
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
