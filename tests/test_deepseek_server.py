"""A tiny DeepSeek-V3 (MLA + MoE) served by the real Truss server, through the openai client.

The model folder is the DeepSeek-V3.1 tool family of tests/tool_models.py (a real
byte-level BPE tokenizer with DeepSeek's tokens and V3.1's chat template), its
model a tiny random DeepseekV3ForCausalLM. The server must pick the
V3.1 tool parser from the template, stream what it answers whole, make forced calls
that validate, give the output of an opened thinking block as reasoning, and log the
latent KV cache's bytes per token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.deepseek_models import save_tiny_deepseek
from tests.private_server import PrivateServer, private_server
from tests.tool_calling_cases import ASK, SCHEMAS
from tests.tool_calling_cases import TOOLS as PLAIN_TOOLS
from tests.tool_models import FAMILIES, build_family

pytest_plugins = ["tests.tokenizer_fixtures", "tests.server_fixture"]

NAME = "deepseek-v3-tiny"
# V3.1's template writes every tool's description.
TOOLS = [
    {
        **tool,
        "function": {"description": f"The {tool['function']['name']} tool", **tool["function"]},
    }
    for tool in PLAIN_TOOLS
]
THINKING_OFF = {"chat_template_args": {"thinking": False}}
THINKING_ON = {"chat_template_args": {"thinking": True}}


@pytest.fixture(scope="module")
def served(request, tmp_path_factory) -> Iterator[tuple[PrivateServer, openai.OpenAI]]:
    base_dir: Path = request.getfixturevalue(f"{FAMILIES['deepseek_v31'].base}_tokenizer_dir")
    folder = build_family(
        "deepseek_v31",
        base_dir,
        tmp_path_factory.mktemp(NAME) / "model",
        save_model=save_tiny_deepseek,
    )
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "DeepseekV3ForCausalLM"
    ]
    overrides = {"model": str(folder), "served_model_name": NAME, "kv_cache_memory_gb": 0.05}
    with private_server(request, tmp_path_factory, overrides, "deepseek-server") as server:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        yield server, client


@pytest.mark.slow
def test_load_log_reports_the_latent_kv_cache(served) -> None:
    server, _ = served
    log = server.log_path.read_text(errors="replace")
    # kv_lora_rank 32 + qk_rope_head_dim 8 per token and layer, 2 layers.
    assert "latent 32 + rope key 8" in log and "per layer x 2 layers" in log
    assert "KV bytes per token" in log


@pytest.mark.slow
def test_streamed_chat_equals_the_whole_answer(served) -> None:
    _, client = served
    kwargs = dict(model=NAME, messages=ASK, max_tokens=8, temperature=0, extra_body=THINKING_OFF)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.content
    assert whole.usage.completion_tokens == 8
    text, finishes = "", []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
    assert text == choice.message.content
    assert finishes == ["length"]


@pytest.mark.slow
def test_forced_v31_tool_calls_validate_streamed_and_not(served) -> None:
    _, client = served
    kwargs = dict(
        model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1,
        seed=5, max_tokens=300, extra_body=THINKING_OFF,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls
    for call_name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[call_name])
    streamed: dict[int, list[str]] = {}
    finishes = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or []:
            entry = streamed.setdefault(piece.index, [piece.function.name, ""])
            entry[1] += piece.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert [tuple(entry) for _, entry in sorted(streamed.items())] == calls
    assert finishes == ["tool_calls"]


@pytest.mark.slow
def test_thinking_output_is_reasoning_streamed_and_not(served) -> None:
    _, client = served
    kwargs = dict(model=NAME, messages=ASK, max_tokens=6, temperature=0, extra_body=THINKING_ON)
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message.model_dump()
    assert message.get("reasoning_content"), message
    assert not message["content"]
    reasoning = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta.model_dump()
            assert not delta.get("content")
            reasoning += delta.get("reasoning_content") or ""
    assert reasoning == message["reasoning_content"]
