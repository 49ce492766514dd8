"""/v1/messages through the real Truss server with the official `anthropic` SDK:
messages.create, messages.stream, a tool-use round trip, thinking, seed, messages.parse
with an output format, and errors raised as the SDK's typed exceptions. The server runs a tiny thinking, tool-calling model
(tests/messages_support.py) started once for this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from flashserve.api.endpoints.messages_format import thinking_signature
from tests.messages_support import ASK, TOOLS, build_thinking_model, parse_events
from tests.private_server import PrivateServer, private_server

pytest_plugins = ["tests.tokenizer_fixtures"]
pytestmark = pytest.mark.slow

MODEL = "tiny-thinker"
GREEDY = {"temperature": 0}
NO_THINKING = {"type": "disabled"}


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sp_tokenizer_dir
) -> Iterator[PrivateServer]:
    folder = build_thinking_model(sp_tokenizer_dir, tmp_path_factory.mktemp("messages_model"))
    overrides = {"model": str(folder), "served_model_name": MODEL, "kv_cache_memory_gb": 0.2}
    with private_server(request, tmp_path_factory, overrides, "messages_server") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: PrivateServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def create(client: anthropic.Anthropic, **fields: Any) -> anthropic.types.Message:
    settings: dict[str, Any] = dict(
        model=MODEL, max_tokens=12, messages=ASK, thinking=NO_THINKING, extra_body=GREEDY
    )
    return client.messages.create(**{**settings, **fields})


def test_create_and_stream_give_the_same_message(client: anthropic.Anthropic) -> None:
    message = create(client, metadata={"user_id": "user-1"})
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 12 and message.usage.input_tokens > 0

    with client.messages.stream(
        model=MODEL, max_tokens=12, messages=ASK, thinking=NO_THINKING, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert [(block.type, block.text) for block in final.content] == [("text", text)]
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 12)


def test_the_raw_stream_is_anthropics_event_sequence(server: PrivateServer) -> None:
    request = {"model": MODEL, "max_tokens": 5, "messages": ASK, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=request, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_events(response.read().decode())
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    assert events[-2][1]["usage"]["output_tokens"] == 5


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    text = create(client).content[0].text
    stop = next(text[i : i + 3] for i in range(1, len(text) - 3) if text.index(text[i : i + 3]) > 0)
    message = create(client, stop_sequences=[stop])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert message.content[0].text == text[: text.index(stop)]


def test_a_tool_use_round_trip(client: anthropic.Anthropic) -> None:
    ask = dict(tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=150)
    message = create(client, **ask)
    assert message.stop_reason == "tool_use"
    (call,) = message.content
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, TOOLS[0]["input_schema"])

    with client.messages.stream(
        model=MODEL, messages=ASK, thinking=NO_THINKING, extra_body=GREEDY, **ask
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [
        ("tool_use", call.name, call.input)
    ]

    history = [
        *ASK,
        message.to_param(),
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}],
        },
    ]
    reply = create(client, messages=history, tools=TOOLS, max_tokens=8)
    assert reply.stop_reason in ("max_tokens", "end_turn", "tool_use") and reply.content

    # The call sent back with a text turn but no tool_result: Anthropic's 400.
    unanswered = [*history[:2], {"role": "user", "content": "never mind"}]
    with pytest.raises(anthropic.BadRequestError, match=rf"messages\[2\]\.content.*{call.id}"):
        create(client, messages=unanswered, tools=TOOLS, max_tokens=8)


def test_thinking_blocks_streamed_signed_and_sent_back(client: anthropic.Anthropic) -> None:
    thinking = {"type": "adaptive"}
    message = create(client, thinking=thinking, max_tokens=8)
    (block,) = message.content  # the prompt opened the block; 8 tokens do not close it
    assert block.type == "thinking" and block.thinking
    assert block.signature == thinking_signature(block.thinking)

    deltas = []
    with client.messages.stream(
        model=MODEL, max_tokens=8, messages=ASK, thinking=thinking, extra_body=GREEDY
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.type)
        final = stream.get_final_message()
    assert final.content == message.content
    assert deltas[-1] == "signature_delta" and set(deltas[:-1]) == {"thinking_delta"}

    # Sent back, the thinking block is the assistant turn's reasoning: accepted.
    history = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump(), {"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert create(client, messages=history, max_tokens=4).content


def test_budget_tokens_ends_the_thinking_and_the_answer_follows(
    client: anthropic.Anthropic,
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 6}
    message = create(client, thinking=thinking, max_tokens=20)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.usage.output_tokens == 20 and message.stop_reason == "max_tokens"
    with client.messages.stream(
        model=MODEL, max_tokens=20, messages=ASK, thinking=thinking, extra_body=GREEDY
    ) as stream:
        final = stream.get_final_message()
    assert [block.model_dump(exclude={"parsed_output"}) for block in final.content] == [
        block.model_dump() for block in message.content
    ]


def test_bad_requests_raise_the_sdks_bad_request_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client, extra_body={"temperatur": 0.5})
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Unknown field 'temperatur': the request does not accept it",
        },
    }
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[0\]\.content\[0\].*text-only"):
        image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
        create(client, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        create(client, thinking={"type": "enabled", "budget_tokens": 50})
    with (
        pytest.raises(anthropic.BadRequestError, match="tool_choice.name"),
        client.messages.stream(
            model=MODEL,
            max_tokens=8,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "nope"},
        ) as stream,
    ):
        stream.get_final_message()


def test_a_malformed_body_is_an_anthropic_error(server: PrivateServer) -> None:
    response = httpx.post(f"{server.url}/v1/messages", content=b"{not json", timeout=60)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in error["error"]["message"]


def test_the_same_text_as_chat_completions(server: PrivateServer, client) -> None:
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = chat.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *ASK],
        max_tokens=12,
        temperature=0,
        extra_body={"chat_template_args": {"enable_thinking": False}},
    )
    message = create(client, system="Be brief.")
    assert message.content[0].text == completion.choices[0].message.content
    assert message.usage.output_tokens == completion.usage.completion_tokens
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == completion.usage.prompt_tokens
    assert json.loads(message.to_json())["usage"]["cache_creation_input_tokens"] == 0


def test_seed_samples_as_chat_does(server: PrivateServer, client) -> None:
    """`seed` (an extension, as in /v1/responses): the same sampled text each time, and
    chat's for the same seed."""
    sampled = {"temperature": 1.0, "top_k": 0, "seed": 7}
    first, again = (create(client, extra_body=sampled).content[0].text for _ in range(2))
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = chat.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=12,
        temperature=1.0,
        seed=7,
        extra_body={"top_k": 0, "chat_template_args": {"enable_thinking": False}},
    )
    assert first == again == completion.choices[0].message.content
    other = create(client, extra_body={**sampled, "seed": 8}).content[0].text
    assert other != first


class Forecast(BaseModel):
    """No numeric bounds: the SDK moves them into descriptions, which a grammar ignores."""

    city: Literal["Paris", "Oslo"]
    sunny: bool


def test_parse_and_stream_with_an_output_format(client: anthropic.Anthropic) -> None:
    ask = dict(model=MODEL, max_tokens=60, messages=ASK, thinking=NO_THINKING, extra_body=GREEDY)
    parsed = client.messages.parse(**ask, output_format=Forecast)
    assert parsed.stop_reason == "end_turn" and isinstance(parsed.parsed_output, Forecast)
    with client.messages.stream(**ask, output_format=Forecast) as stream:
        final = stream.get_final_message()
    assert final.parsed_output == parsed.parsed_output
