"""/v1/responses through the official openai client against the real Truss server:
responses.create (whole and stream=True), responses.stream, function tools with their
outputs sent back, previous_response_id, json_schema, and refusals as the SDK raises them.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.ops_client import engine_idle, sample, scrape, wait_until
from tests.tool_calling_cases import SCHEMAS, TOOLS

pytest_plugins = ["tests.server_fixture"]
pytestmark = pytest.mark.slow

FLAT_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def client(truss_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
    )


def test_create_and_the_same_tokens_as_chat(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="m",
        instructions="Answer briefly.",
        input="Tell me a story.",
        max_output_tokens=12,
        temperature=1,
        top_p=0.9,
        extra_body={"seed": 21},
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.content[0].type == "output_text"
    assert response.output_text and response.usage.output_tokens == 12
    assert response.usage.total_tokens == response.usage.input_tokens + 12

    chat = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Tell me a story."},
        ],
        max_tokens=12,
        temperature=1,
        top_p=0.9,
        seed=21,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_stream_true_events(client: openai.OpenAI) -> None:
    kwargs = dict(model="m", input="Tell me a story.", max_output_tokens=8, temperature=1,
                  extra_body={"seed": 3})  # fmt: skip
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text == events[-1].response.output_text


def test_stream_helper(client: openai.OpenAI) -> None:
    kwargs = dict(model="m", input="Tell me a story.", max_output_tokens=40, temperature=1,
                  extra_body={"seed": 8, "stop": ["."]})  # fmt: skip
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        text = "".join(
            event.delta for event in stream if event.type == "response.output_text.delta"
        )
        final = stream.get_final_response()
    assert final.status == whole.status
    assert text == final.output_text == whole.output_text


def test_function_tools_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="m",
        input=[{"role": "user", "content": ASK}],
        tools=FLAT_TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
        temperature=1,
        extra_body={"seed": 5},
    )
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}
    follow = dict(model="m", tools=FLAT_TOOLS, max_output_tokens=8, temperature=1,
                  extra_body={"seed": 6})  # fmt: skip
    sent_back = client.responses.create(
        **follow, input=[{"role": "user", "content": ASK}, *first.output, result]
    )
    chained = client.responses.create(**follow, input=[result], previous_response_id=first.id)
    assert chained.previous_response_id == first.id
    # The stored conversation is the one the client sent back in full.
    assert chained.usage.input_tokens == sent_back.usage.input_tokens
    assert [item.type for item in chained.output] == [item.type for item in sent_back.output]
    assert chained.output_text == sent_back.output_text
    # The SDK's own output objects go back as input as they are (messages too).
    history = [{"role": "user", "content": ASK}, *first.output, result, *sent_back.output]
    third = client.responses.create(**follow, input=[*history, {"role": "user", "content": "Ok"}])
    assert third.status in ("completed", "incomplete")
    assert third.usage.input_tokens > sent_back.usage.input_tokens


def test_streamed_function_calls(client: openai.OpenAI) -> None:
    kwargs = dict(model="m", input=ASK, tools=FLAT_TOOLS, tool_choice="required",
                  max_output_tokens=300, temperature=1, extra_body={"seed": 11})  # fmt: skip
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        arguments: dict[str, str] = {}
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                arguments[event.item_id] = arguments.get(event.item_id, "") + event.delta
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and [(c.name, c.arguments) for c in calls] == [
        (c.name, c.arguments) for c in whole.output
    ]
    assert [arguments.get(c.id, "") for c in calls] == [c.arguments for c in calls]
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


class Trip(BaseModel):
    city: str = Field(max_length=8)
    days: int


def test_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="m",
        input="Plan a trip.",
        text={"format": {"type": "json_schema", "name": "trip", "schema": schema, "strict": True}},
        max_output_tokens=60,
        extra_body={"seed": 1},
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    # The SDK's own helper: a pydantic model as the format, the output parsed back.
    parsed = client.responses.parse(
        model="m", input="Plan a trip.", text_format=Trip, max_output_tokens=60,
        extra_body={"seed": 1},
    )  # fmt: skip
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Trip)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": "x", "extra_body": {"temprature": 1}}, "temprature"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c1", "output": "1"}]},
            "input[0].call_id",
        ),
    ],  # fmt: skip
    ids=["unknown-field", "hosted-tool", "unknown-previous", "orphan-output"],
)
def test_refusals(client: openai.OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", max_output_tokens=4, **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_a_dropped_stream_is_aborted(client: openai.OpenAI, truss_server: str) -> None:
    before = sample(scrape(truss_server), "flashserve_requests_total", outcome="aborted")
    stream = client.responses.create(
        model="m", input="Tell me a story.", max_output_tokens=1500, temperature=1,
        extra_body={"seed": 1}, stream=True,
    )  # fmt: skip
    for event in stream:
        if event.type == "response.output_text.delta":
            break
    stream.close()
    assert wait_until(lambda: engine_idle(truss_server), 15), scrape(truss_server)
    after = sample(scrape(truss_server), "flashserve_requests_total", outcome="aborted")
    assert after == before + 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_deadline_header(client: openai.OpenAI, truss_server: str, stream: bool) -> None:
    kwargs = dict(model="m", input="Tell me a story.", max_output_tokens=1500, temperature=1,
                  extra_body={"seed": 1}, extra_headers={"x-request-timeout": "1.5"})  # fmt: skip
    if stream:
        events = list(client.responses.create(**kwargs, stream=True))
        assert events[-1].type == "response.failed"
        assert events[-1].response.status == "failed"
        assert "deadline" in events[-1].response.error.message
    else:
        with pytest.raises(openai.APIStatusError) as caught:
            client.responses.create(**kwargs)
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "timeout"
    assert wait_until(lambda: engine_idle(truss_server), 15), scrape(truss_server)


def test_hostile_bodies_are_400s_beside_an_undisturbed_request(
    client: openai.OpenAI, truss_server: str
) -> None:
    canary = {"model": "m", "input": "Say something.", "max_output_tokens": 24,
              "temperature": 1, "seed": 4}  # fmt: skip
    alone = client.responses.create(**{k: v for k, v in canary.items() if k != "seed"},
                                    extra_body={"seed": 4}).output_text  # fmt: skip
    hostile = [
        b"\xff\xfe{}",
        b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        json.dumps({"input": [{"role": "user", "content": "x"}] * 60_000}).encode(),
        b'["input"]',
        json.dumps({"input": "x", "temperature": float("nan")}).encode(),
        json.dumps({"input": [{"type": "message", "role": "user", "content": [{}]}]}).encode(),
    ]

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=truss_server, timeout=120) as http:
            headers = {"Content-Type": "application/json"}
            posts = [http.post("/v1/responses", content=raw, headers=headers) for raw in hostile]
            first, *rest = await asyncio.gather(http.post("/v1/responses", json=canary), *posts)
            return first, rest

    first, refused = asyncio.run(run())
    assert first.status_code == 200
    assert (
        "".join(part["text"] for item in first.json()["output"] for part in item["content"])
        == alone
    )
    for raw, reply in zip(hostile, refused, strict=True):
        assert reply.status_code == 400, (raw[:40], reply.text[:200])
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
    assert wait_until(lambda: engine_idle(truss_server), 15), scrape(truss_server)
