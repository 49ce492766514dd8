"""Chat completions as current `openai` clients call them, against the real Truss server:
OpenAI's request names and values the published schema lacks (max_completion_tokens,
the developer role, reasoning_effort, json_schema strict false) and the SDK's
structured-output helpers (parse with a pydantic model, a pydantic function tool).
"""

from __future__ import annotations

from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

pytest_plugins = ["tests.server_fixture"]
pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Tell me about the sea."}]
# Seeded sampling: the random embedded model's greedy text is mostly one special token.
SAMPLED: dict[str, Any] = {"temperature": 1.0, "seed": 4}
# Prints the template variables reasoning_effort sets, so the prompt shows what arrived.
THINKING_PROBE_TEMPLATE = (
    "{{ 'thinking on' if enable_thinking else 'thinking off' }}"
    "{% for m in messages %}\n{{ m['role'] }}: {{ m['content'] }}{% endfor %}\nassistant:"
)


@pytest.fixture(scope="module")
def client(truss_server: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{truss_server}/v1", api_key="unused", max_retries=0, timeout=120
    )


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    """A seeded chat call; 6 tokens unless `fields` set a length."""
    if "max_tokens" not in fields and "max_completion_tokens" not in fields:
        fields["max_tokens"] = 6
    return client.chat.completions.create(**{"model": "m", "messages": ASK, **SAMPLED, **fields})


def test_max_completion_tokens_is_max_tokens(client: openai.OpenAI) -> None:
    reply = chat(client, max_completion_tokens=5)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == chat(client, max_tokens=5).choices[0].message.content
    assert chat(client, max_tokens=5, max_completion_tokens=5).usage.completion_tokens == 5

    for fields in ({"max_completion_tokens": 0}, {"max_completion_tokens": 5, "max_tokens": 6}):
        with pytest.raises(openai.BadRequestError) as refused:
            chat(client, **fields)
        assert refused.value.body["param"] == "max_completion_tokens"
        assert "'max_completion_tokens'" in refused.value.body["message"]


def test_a_developer_message_is_a_system_message(client: openai.OpenAI) -> None:
    brief = "Answer in one word."
    as_developer = chat(client, messages=[{"role": "developer", "content": brief}, *ASK])
    as_system = chat(client, messages=[{"role": "system", "content": brief}, *ASK])
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens


@pytest.mark.parametrize(
    ("effort", "thinking"), [("none", False), ("minimal", False), ("high", True)]
)
def test_reasoning_effort_sets_the_templates_thinking_switch(
    client: openai.OpenAI, effort: str, thinking: bool
) -> None:
    probe = {"chat_template": THINKING_PROBE_TEMPLATE}
    by_effort = chat(client, reasoning_effort=effort, logprobs=True, extra_body=probe)
    explicit = chat(
        client,
        logprobs=True,
        extra_body={**probe, "chat_template_args": {"enable_thinking": thinking}},
    )
    assert by_effort.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert [t.logprob for t in by_effort.choices[0].logprobs.content] == [
        t.logprob for t in explicit.choices[0].logprobs.content
    ]
    # The request's own chat_template_args win over the effort's.
    overridden = chat(
        client,
        reasoning_effort=effort,
        logprobs=True,
        extra_body={**probe, "chat_template_args": {"enable_thinking": not thinking}},
    )
    assert overridden.choices[0].logprobs.content != by_effort.choices[0].logprobs.content

    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, reasoning_effort="extreme")
    assert refused.value.body["param"] == "reasoning_effort"


def test_json_schema_strict_false_is_no_strict(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"calm": {"type": "boolean"}}, "required": ["calm"]}
    answers = [
        chat(
            client,
            max_tokens=40,
            response_format={"type": "json_schema", "json_schema": {"name": "r", **strict}},
        ).choices[0]
        for strict in ({"schema": schema, "strict": False}, {"schema": schema})
    ]
    # Without strict the object may take extra properties, so it need not end in 40 tokens.
    assert answers[0].message.content == answers[1].message.content
    assert answers[0].message.content.startswith("{")


class Reading(BaseModel):
    """Bounded, so that even a random model's strings end within max_tokens."""

    place: str = Field(max_length=8)
    kind: Literal["tide", "wave"]
    calm: bool
    height: int = Field(ge=0, le=99)


def test_parse_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model="m", messages=ASK, max_tokens=120, response_format=Reading, **SAMPLED
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Reading)
    assert Reading.model_validate_json(choice.message.content) == choice.message.parsed

    with client.chat.completions.stream(
        model="m", messages=ASK, max_tokens=120, response_format=Reading, **SAMPLED
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == choice.message.parsed


def test_parse_with_a_pydantic_function_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(
        model="m",
        messages=ASK,
        max_tokens=120,
        tools=[openai.pydantic_function_tool(Reading)],
        tool_choice={"type": "function", "function": {"name": "Reading"}},
        **SAMPLED,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert isinstance(call.function.parsed_arguments, Reading)
