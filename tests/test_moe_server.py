"""MoE checkpoints served by the real Truss server, through the official openai client.

A tiny Qwen3-MoE with a Qwen3-style (ChatML, Hermes tool calls) template and a
tiny GLM-4.5 MoE with GLM-4.6's own template, each with a real tokenizer
(tests/tool_models.py, models from tests/tiny_models.py); one server per
model. Each serves a streamed chat equal to the non-streamed one, forced
tool calls that validate (streamed and not), and reasoning when the prompt
opens a thinking block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.private_server import private_server
from tests.tiny_models import save_tiny_glm4_moe, save_tiny_qwen3_moe
from tests.tool_calling_cases import ASK, SCHEMAS, TOOLS
from tests.tool_models import FAMILIES, build_family

pytest_plugins = ["tests.tokenizer_fixtures", "tests.server_fixture"]

MODELS = {
    "qwen3-moe": ("hermes", save_tiny_qwen3_moe, "Qwen3MoeForCausalLM"),
    "glm4-moe": ("glm45", save_tiny_glm4_moe, "Glm4MoeForCausalLM"),
}
# A request template whose prompt leaves the output inside a thinking block (and which
# renders earlier turns' reasoning, so the server knows its tags).
PAST_REASONING = "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
OPEN_THINKING = {
    "qwen3-moe": "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    + PAST_REASONING
    + "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n<think>\n",
    "glm4-moe": "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    + PAST_REASONING
    + "{{ m.content }}{% endfor %}<|assistant|>\n<think>",
}
THINKING_OFF = {"chat_template_args": {"enable_thinking": False}}


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tmp_path_factory) -> Iterator[tuple[str, openai.OpenAI]]:
    name = request.param
    family, save_model, architecture = MODELS[name]
    base_dir: Path = request.getfixturevalue(f"{FAMILIES[family].base}_tokenizer_dir")
    folder = build_family(family, base_dir, tmp_path_factory.mktemp(name) / "model", 0, save_model)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    overrides = {"model": str(folder), "served_model_name": name, "kv_cache_memory_gb": 0.1}
    with private_server(request, tmp_path_factory, overrides, f"{name}-server") as server:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        yield name, client


@pytest.mark.slow
def test_streamed_chat_equals_the_whole_answer(served) -> None:
    name, client = served
    kwargs = dict(model=name, messages=ASK, max_tokens=8, temperature=0, extra_body=THINKING_OFF)
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
def test_forced_tool_calls_validate_streamed_and_not(served) -> None:
    name, client = served
    kwargs = dict(
        model=name, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1,
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
def test_output_inside_an_opened_thinking_block_is_reasoning(served) -> None:
    name, client = served
    kwargs = dict(
        model=name, messages=ASK, max_tokens=6, temperature=0,
        extra_body={"chat_template": OPEN_THINKING[name]},
    )  # fmt: skip
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
