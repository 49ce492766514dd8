"""MoE checkpoints served by the real Truss server, through the official openai client.

A tiny Qwen3-MoE with a Qwen3-style (ChatML, Hermes tool calls) template and a
tiny GLM-4.5 MoE with GLM-4.6's own template, each with a real tokenizer
(tests/tool_models.py, models from tests/tiny_models.py); one server per
model. Each serves a streamed chat equal to the non-streamed one, forced
tool calls that validate (streamed and not), and reasoning when the prompt
opens a thinking block.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.served_checkpoint import (
    check_forced_tool_calls_validate_streamed_and_not,
    check_output_is_reasoning_streamed_and_not,
    check_streamed_chat_equals_the_whole_answer,
    serve_family,
)
from tests.tiny_models import save_tiny_glm4_moe, save_tiny_qwen3_moe
from tests.tool_calling_cases import ASK, TOOLS

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
    with serve_family(
        request, tmp_path_factory, family, name, save_model, architecture, kv_cache_memory_gb=0.1
    ) as (_, client):
        yield name, client


@pytest.mark.slow
def test_streamed_chat_equals_the_whole_answer(served) -> None:
    name, client = served
    kwargs = dict(model=name, messages=ASK, max_tokens=8, temperature=0, extra_body=THINKING_OFF)
    check_streamed_chat_equals_the_whole_answer(client, kwargs)


@pytest.mark.slow
def test_forced_tool_calls_validate_streamed_and_not(served) -> None:
    name, client = served
    kwargs = dict(
        model=name, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1,
        seed=5, max_tokens=300, extra_body=THINKING_OFF,
    )  # fmt: skip
    check_forced_tool_calls_validate_streamed_and_not(client, kwargs)


@pytest.mark.slow
def test_output_inside_an_opened_thinking_block_is_reasoning(served) -> None:
    name, client = served
    kwargs = dict(
        model=name, messages=ASK, max_tokens=6, temperature=0,
        extra_body={"chat_template": OPEN_THINKING[name]},
    )  # fmt: skip
    check_output_is_reasoning_streamed_and_not(client, kwargs)
