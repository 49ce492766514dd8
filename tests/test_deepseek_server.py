"""A tiny DeepSeek-V3 (MLA + MoE) served by the real Truss server, through the openai client.

The model folder is the DeepSeek-V3.1 tool family of tests/tool_models.py (a real
byte-level BPE tokenizer with DeepSeek's tokens and V3.1's chat template), its
model a tiny random DeepseekV3ForCausalLM. The server must pick the
V3.1 tool parser from the template, stream what it answers whole, make forced calls
that validate, give the output of an opened thinking block as reasoning, and log the
latent KV cache's bytes per token.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.deepseek_models import save_tiny_deepseek
from tests.private_server import PrivateServer
from tests.served_checkpoint import (
    check_forced_tool_calls_validate_streamed_and_not,
    check_output_is_reasoning_streamed_and_not,
    check_streamed_chat_equals_the_whole_answer,
    serve_family,
)
from tests.tool_calling_cases import ASK
from tests.tool_calling_cases import TOOLS as PLAIN_TOOLS

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
    with serve_family(
        request, tmp_path_factory, "deepseek_v31", NAME, save_tiny_deepseek,
        "DeepseekV3ForCausalLM", kv_cache_memory_gb=0.05,
    ) as served:  # fmt: skip
        yield served


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
    check_streamed_chat_equals_the_whole_answer(client, kwargs)


@pytest.mark.slow
def test_forced_v31_tool_calls_validate_streamed_and_not(served) -> None:
    _, client = served
    kwargs = dict(
        model=NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1,
        seed=5, max_tokens=300, extra_body=THINKING_OFF,
    )  # fmt: skip
    check_forced_tool_calls_validate_streamed_and_not(client, kwargs)


@pytest.mark.slow
def test_thinking_output_is_reasoning_streamed_and_not(served) -> None:
    _, client = served
    kwargs = dict(model=NAME, messages=ASK, max_tokens=6, temperature=0, extra_body=THINKING_ON)
    check_output_is_reasoning_streamed_and_not(client, kwargs)
