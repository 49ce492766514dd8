"""/v1/completions through the real Truss server, called with the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytest_plugins = ["tests.server_fixture"]

pytestmark = pytest.mark.slow

# Seeded sampling: the random embedded model's greedy text is mostly one special token.
SAMPLED = {"temperature": 1.0, "seed": 4, "extra_body": {"top_k": -1, "ignore_eos": True}}


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10, follow_redirects=True).text
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def wait_until_idle(base_url: str) -> None:
    """Until no sequence runs and no KV block is held (10 s at most)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        gauge(base_url, "flashserve_kv_blocks_used")
        or gauge(base_url, "flashserve_running_sequences")
    ):
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(truss_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
    )


def test_completion_has_the_openai_shape(client):
    response = client.completions.create(model="m", prompt="The sea is", max_tokens=6, **SAMPLED)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.created > 0 and response.model
    (choice,) = response.choices
    assert choice.index == 0 and choice.text and choice.finish_reason == "length"
    assert choice.logprobs is None
    usage = response.usage
    assert usage.completion_tokens == 6 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_default_max_tokens_is_16(client):
    response = client.completions.create(model="m", prompt="The sea is", **SAMPLED)
    assert response.usage.completion_tokens == 16


def test_stream_with_usage_equals_the_whole_completion(client):
    kwargs = dict(model="m", prompt=["The sea is", "A cat"], max_tokens=8, **SAMPLED)
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    streamed = ["", ""]
    finishes = {}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and chunk.id == chunks[0].id
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert streamed == [choice.text for choice in whole.choices]
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_several_prompts_and_token_ids(client):
    tokens = client.completions.create(model="m", prompt=[[1, 1183, 6089], [1, 1183]], max_tokens=3)
    assert [choice.index for choice in tokens.choices] == [0, 1]
    assert tokens.usage.prompt_tokens == 5 and tokens.usage.completion_tokens == 6
    texts = client.completions.create(model="m", prompt=["a", "b", "c"], max_tokens=2)
    assert [choice.index for choice in texts.choices] == [0, 1, 2]


def test_echo_and_logprobs(client):
    echoed = client.completions.create(
        model="m", prompt="The sea", max_tokens=4, echo=True, **SAMPLED
    )
    plain = client.completions.create(model="m", prompt="The sea", max_tokens=4, **SAMPLED)
    assert echoed.choices[0].text == "The sea" + plain.choices[0].text
    scored = client.completions.create(
        model="m", prompt="The sea", max_tokens=4, logprobs=2, **SAMPLED
    )
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(
        top[token] == lp
        for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)
    )
    assert logprobs.text_offset[0] == 0


def test_suffix_fills_in_the_middle(client):
    # The embedded model's Mistral tokenizer has [PREFIX]/[SUFFIX].
    response = client.completions.create(
        model="m", prompt="def area(r):\n", suffix="    return a\n", max_tokens=4, **SAMPLED
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 4


def test_stop_ends_the_text(client):
    full = client.completions.create(model="m", prompt="The sea", max_tokens=12, **SAMPLED)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = client.completions.create(
        model="m", prompt="The sea", max_tokens=12, stop=stop, **SAMPLED
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_same_tokens_as_chat_on_the_rendered_prompt(truss_server, client):
    from transformers import AutoTokenizer

    from tests.chat_harness import EMBEDDED_MODEL

    messages = [{"role": "user", "content": "Tell me about the sea."}]
    rendered = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    settings = dict(model="m", max_tokens=12, logprobs=True, **SAMPLED)
    chat = client.chat.completions.create(messages=messages, **settings)
    completion = client.completions.create(prompt=rendered, **{**settings, "logprobs": 0})
    # Token by token: the same tokens with the same log probabilities, not only the same text.
    chat_entries = chat.choices[0].logprobs.content
    scored = completion.choices[0].logprobs
    assert [t.logprob for t in chat_entries] == scored.token_logprobs
    for entry, token in zip(chat_entries, scored.tokens):
        if not token.startswith("bytes:"):  # legacy logprobs name partial UTF-8 by its bytes
            assert entry.token == token
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens
    assert len(scored.tokens) == 12


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"echo": True, "logprobs": 1}, "logprobs"),
        ({"logprobs": 30}, "logprobs"),
        ({"extra_body": {"messages": []}}, "messages"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_requests_raise_bad_request_naming_the_field(client, kwargs, param):
    request = {"model": "m", "prompt": "The sea", **kwargs}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**request)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"


def test_dropped_stream_of_several_prompts_releases_their_kv_blocks(truss_server):
    body = {
        "model": "m",
        "prompt": ["a", "b", "c"],
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{truss_server}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert gauge(truss_server, "flashserve_running_sequences") == 3
    wait_until_idle(truss_server)
    assert gauge(truss_server, "flashserve_kv_blocks_used") == 0
    assert gauge(truss_server, "flashserve_running_sequences") == 0


def test_deadline_header_ends_every_prompt_with_504(truss_server):
    body = {"model": "m", "prompt": ["a", "b"], "max_tokens": 1500, "ignore_eos": True}
    response = httpx.post(
        f"{truss_server}/v1/completions",
        json=body,
        headers={"x-request-timeout": "1"},
        timeout=60,
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout_error"
    wait_until_idle(truss_server)
    assert gauge(truss_server, "flashserve_running_sequences") == 0
    assert gauge(truss_server, "flashserve_kv_blocks_used") == 0
