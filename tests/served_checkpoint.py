"""Serve a tiny checkpoint with the real Truss server and check its chat answers.

A test module builds a model folder of tests/tool_models.py (a real tokenizer and
chat template, a tiny random model), serves it with `serve_family` once per module,
and runs the checks below through the official openai client: a streamed chat
equal to the whole one, forced tool calls that validate streamed and not, and
reasoning where the prompt leaves the output inside a thinking block.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.private_server import PrivateServer, private_server
from tests.tool_calling_cases import SCHEMAS
from tests.tool_models import FAMILIES, build_family


@contextmanager
def serve_family(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    family: str,
    name: str,
    save_model: Callable[..., Any],
    architecture: str,
    kv_cache_memory_gb: float,
    overrides: dict[str, Any] | None = None,
) -> Iterator[tuple[PrivateServer, openai.OpenAI]]:
    """Build `family`'s folder with `save_model`'s model and serve it as `name`
    (`overrides`: more engine settings)."""
    base_dir: Path = request.getfixturevalue(f"{FAMILIES[family].base}_tokenizer_dir")
    folder = build_family(
        family, base_dir, tmp_path_factory.mktemp(name) / "model", save_model=save_model
    )
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    settings = {
        "model": str(folder),
        "served_model_name": name,
        "kv_cache_memory_gb": kv_cache_memory_gb,
        **(overrides or {}),
    }
    with private_server(request, tmp_path_factory, settings, f"{name}-server") as server:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        yield server, client


def check_streamed_chat_equals_the_whole_answer(
    client: openai.OpenAI, kwargs: dict[str, Any]
) -> None:
    """`kwargs` ask for 8 tokens of plain content (greedy)."""
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


def check_forced_tool_calls_validate_streamed_and_not(
    client: openai.OpenAI, kwargs: dict[str, Any]
) -> None:
    """`kwargs` force tool calls of tests/tool_calling_cases.py's tools (seeded)."""
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


def check_output_is_reasoning_streamed_and_not(
    client: openai.OpenAI, kwargs: dict[str, Any]
) -> None:
    """`kwargs` leave the output inside a thinking block for all its tokens."""
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
