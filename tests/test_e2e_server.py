"""End to end: the real Truss server on the embedded model, called with the openai client."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

pytest_plugins = ["tests.server_fixture"]

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def client(truss_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def served_model(truss_server: str) -> str:
    body = httpx.post(
        f"{truss_server}/v1/chat/completions",
        json={"model": "x", "messages": HELLO, "max_tokens": 1},
        timeout=60,
    ).json()
    return body["model"]


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10, follow_redirects=True).text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_non_streaming_completion_has_openai_shape(client, served_model):
    response = client.chat.completions.create(
        model="any-name", messages=HELLO, max_tokens=12, temperature=0
    )
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == served_model
    assert response.created > 0
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.completion_tokens <= 12 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12


def test_streamed_text_equals_non_streamed_text(client):
    kwargs = dict(
        model="m", messages=HELLO, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert whole.usage.completion_tokens == 40


def test_raw_stream_is_server_sent_events_ending_in_done(truss_server):
    body = {"model": "m", "messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream(
        "POST", f"{truss_server}/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert len({p["id"] for p in payloads}) == 1


def test_predict_endpoint_takes_the_same_request(truss_server):
    body = {"model": "m", "messages": HELLO, "max_tokens": 3}
    response = httpx.post(f"{truss_server}/v1/models/model:predict", json=body, timeout=60)
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"


def test_stop_string_is_not_streamed(client):
    whole = client.chat.completions.create(
        model="m", messages=HELLO, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    text = whole.choices[0].message.content
    assert len(text) > 6
    stop = text[3:6]
    expected = text[: text.index(stop)]
    for stream in (False, True):
        response = client.chat.completions.create(
            model="m",
            messages=HELLO,
            max_tokens=30,
            temperature=0,
            stop=[stop],
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if stream:
            chunks = [c for c in response if c.choices]
            got = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            assert finish == ["stop"]
        else:
            got = response.choices[0].message.content
            assert response.choices[0].finish_reason == "stop"
            assert response.choices[0].model_extra.get("stop_reason") == stop
        assert got == expected


INVALID = [
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"frobnicate": True}, "frobnicate"),
    ({"top_p": 0}, "top_p"),
    ({"stop": [""]}, "stop"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        },
        "messages",
    ),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "sea " * 5000}]}, "messages"),
]


@pytest.mark.parametrize(("change", "param"), INVALID, ids=[p for _, p in INVALID])
def test_invalid_requests_get_400_naming_the_field(truss_server, change, param):
    body = {"model": "m", "messages": HELLO, **change}
    response = httpx.post(f"{truss_server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param)
    assert param.split(".")[0] in error["message"] or param in (error["param"] or "")


def test_openai_client_raises_bad_request_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="m", messages=HELLO, extra_body={"n": 3})
    assert raised.value.body["param"] == "n"


def test_dropped_stream_releases_its_kv_blocks(truss_server):
    body = {"model": "m", "messages": HELLO, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{truss_server}/v1/chat/completions", json=body, timeout=60
    ) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(truss_server, "flashserve_kv_blocks_used") > 0
    # The connection is closed; the sequence must be aborted and its blocks freed.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (
            metric(truss_server, "flashserve_kv_blocks_used") == 0
            and metric(truss_server, "flashserve_running_sequences") == 0
        ):
            break
        time.sleep(0.05)
    assert metric(truss_server, "flashserve_kv_blocks_used") == 0
    assert metric(truss_server, "flashserve_running_sequences") == 0
    # The server keeps serving.
    ok = httpx.post(
        f"{truss_server}/v1/chat/completions",
        json={"model": "m", "messages": HELLO, "max_tokens": 2},
        timeout=60,
    )
    assert ok.status_code == 200


def test_text_alone_equals_text_among_16_concurrent_requests(truss_server, client):
    import asyncio

    # The random embedded model's greedy choice is nearly always one special token
    # (empty text); seeded sampling gives varied, reproducible text instead, and
    # must not depend on what else shares the batch.
    prompts = [
        [{"role": "user", "content": "tell me " + "more " * (i * 7 % 40) + str(i)}]
        for i in range(16)
    ]
    kwargs = dict(
        model="m", max_tokens=20, temperature=1.0, extra_body={"ignore_eos": True, "top_k": -1}
    )
    alone = [
        client.chat.completions.create(messages=p, seed=i, **kwargs).choices[0].message.content
        for i, p in enumerate(prompts)
    ]
    assert all(alone) and len(set(alone)) == len(alone)

    async def together():
        aclient = openai.AsyncOpenAI(
            base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
        )
        replies = await asyncio.gather(
            *(
                aclient.chat.completions.create(messages=p, seed=i, **kwargs)
                for i, p in enumerate(prompts)
            )
        )
        await aclient.close()
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(together()) == alone


def test_embeddings_says_this_deployment_serves_a_generative_model(client, served_model):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="m", input="the sea")
    error = caught.value.body
    assert caught.value.status_code == 404
    assert error["type"] == "not_found_error" and error["code"] == "model_not_embedding"
    assert "generative model" in error["message"] and served_model in error["message"]
