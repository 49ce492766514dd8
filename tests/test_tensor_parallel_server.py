"""tensor_parallel_size 2 through the real Truss server gives tp=1's tokens.

One tiny Qwen3-MoE (Hermes tool calls, a real tokenizer) served twice, fp32:
at tensor_parallel_size 1 and at 2 (`--set tensor_parallel_size=2`, as the
local serve command takes it), the latter with a KV cache small enough that
concurrent requests preempt each other. Streaming chat, structured output,
forced tool calls, and a concurrent batch under preemption and prefix
caching answer the same on both. Last, SIGTERM to the tp=2 server leaves no
worker process behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import psutil
import pytest

from tests.ops_client import sample, scrape, wait_until
from tests.private_server import PrivateServer
from tests.served_checkpoint import check_streamed_chat_equals_the_whole_answer, serve_family
from tests.tensor_parallel_support import free_port, spawned_workers
from tests.tiny_models import save_tiny_qwen3_moe
from tests.tool_calling_cases import ASK, SCHEMAS, TOOLS

pytest_plugins = ["tests.tokenizer_fixtures", "tests.server_fixture"]

NAME = "qwen3-moe"
THINKING_OFF = {"chat_template_args": {"enable_thinking": False}}
FP32 = {"dtype": "float32"}
# ~60 blocks of 16 tokens per rank (976 tokens: room for the tool prompt and its
# answer), while sixteen concurrent answers of ~150 tokens need ~180: they preempt.
SMALL_KV_GB = 0.00025


@pytest.fixture(scope="module")
def single(request, tmp_path_factory) -> Iterator[openai.OpenAI]:
    with serve_family(
        request, tmp_path_factory, "hermes", NAME, save_tiny_qwen3_moe, "Qwen3MoeForCausalLM",
        kv_cache_memory_gb=0.05, overrides=FP32,
    ) as (_, client):  # fmt: skip
        yield client


@pytest.fixture(scope="module")
def split(request, tmp_path_factory) -> Iterator[tuple[PrivateServer, openai.OpenAI]]:
    overrides = {**FP32, "tensor_parallel_size": 2, "tensor_parallel_port": free_port()}
    with serve_family(
        request, tmp_path_factory, "hermes", NAME, save_tiny_qwen3_moe, "Qwen3MoeForCausalLM",
        kv_cache_memory_gb=SMALL_KV_GB, overrides=overrides,
    ) as (server, client):  # fmt: skip
        yield server, client


def chat(client: openai.OpenAI, **kwargs) -> dict:
    reply = client.chat.completions.create(model=NAME, messages=ASK, **kwargs)
    return reply.choices[0].message.model_dump()


@pytest.mark.slow
def test_streamed_chat_is_the_whole_answer_and_tp1s(single, split) -> None:
    server, client = split
    assert len(spawned_workers(server.proc.pid)) == 1
    kwargs = dict(model=NAME, messages=ASK, max_tokens=8, temperature=0, extra_body=THINKING_OFF)
    check_streamed_chat_equals_the_whole_answer(client, kwargs)
    assert chat(client, max_tokens=24, temperature=0, extra_body=THINKING_OFF) == chat(
        single, max_tokens=24, temperature=0, extra_body=THINKING_OFF
    )


@pytest.mark.slow
def test_structured_output_is_tp1s(single, split) -> None:
    _, client = split
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}}
    kwargs = dict(max_tokens=120, temperature=0, response_format=fmt, extra_body=THINKING_OFF)
    got = chat(client, **kwargs)
    jsonschema.validate(json.loads(got["content"]), schema)
    assert got == chat(single, **kwargs)


@pytest.mark.slow
def test_forced_tool_calls_are_tp1s(single, split) -> None:
    _, client = split
    kwargs = dict(
        tools=TOOLS, tool_choice="required", temperature=1, seed=5, max_tokens=300,
        extra_body=THINKING_OFF,
    )  # fmt: skip
    got = chat(client, **kwargs)
    assert got["tool_calls"]
    for call in got["tool_calls"]:
        jsonschema.validate(
            json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]]
        )
    expected = chat(single, **kwargs)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in got["tool_calls"]]
    assert calls == [
        (c["function"]["name"], c["function"]["arguments"]) for c in expected["tool_calls"]
    ]


@pytest.mark.slow
def test_preemption_and_prefix_caching_keep_tp1s_tokens(single, split) -> None:
    server, client = split
    before = scrape(server.url)
    asks = [
        [{"role": "user", "content": f"Tell me story number {i} about the sea."}] for i in range(8)
    ]
    # Each prompt twice: the second of a pair reuses the first's cached prefix blocks.
    prompts = asks + asks

    def answer(target: openai.OpenAI, messages: list) -> str:
        reply = target.chat.completions.create(
            model=NAME, messages=messages, max_tokens=150, temperature=0,
            extra_body={**THINKING_OFF, "ignore_eos": True},
        )  # fmt: skip
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda m: answer(client, m), prompts))
    expected = [answer(single, m) for m in asks]
    assert got == expected + expected
    after = scrape(server.url)
    assert sample(after, "flashserve_preemptions_total") > sample(
        before, "flashserve_preemptions_total"
    )
    assert sample(after, "flashserve_prefix_cache_hit_rate") > 0


@pytest.mark.slow
def test_sigterm_to_the_server_leaves_no_worker(split) -> None:
    server, _ = split
    workers = spawned_workers(server.proc.pid)
    assert workers
    os.kill(server.proc.pid, signal.SIGTERM)  # the server alone, not its process group
    server.proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, [p.pid for p in alive]
    time.sleep(0.1)
    assert wait_until(lambda: not spawned_workers(server.proc.pid), 5)
