"""Reasoning output: <think> blocks to reasoning_content, streamed and not, and their tokens."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.output.output_plan import OutputFormats
from flashserve.api.frontend.output.reasoning import (
    ReasoningParser,
    prompt_thinking_state,
    resolve_reasoning,
)
from flashserve.api.frontend.output.response_parser import ResponseParser, join_tool_calls
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.frontend.tool_parsers import HermesToolParser
from flashserve.api.frontend.tools import plan_tools
from tests.tool_models import answer_all, template

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]


def split(parser_factory, text: str) -> list[tuple[str, str]]:
    """(reasoning, answer) for the text whole, char by char, and cut at every position."""
    results = []
    cuts = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for chunks in cuts:
        parser = parser_factory()
        reasoning = answer = ""
        for chunk in chunks:
            r, a = parser.feed(chunk)
            reasoning, answer = reasoning + r, answer + a
        r, a = parser.finish()
        results.append((reasoning + r, answer + a))
    return results


@pytest.mark.parametrize(
    "state, text, reasoning, answer",
    [
        (
            "free",
            "<think>\nI should check.\n</think>\n\nThe answer.",
            "I should check.",
            "The answer.",
        ),
        ("free", "  <think>a</think>b", "a", "b"),
        ("free", "<think>\n\n</think>\n\nHi", "", "Hi"),
        ("free", "Just an answer.\n", "", "Just an answer.\n"),
        ("free", "<thinking> is not the tag", "", "<thinking> is not the tag"),
        ("free", "Later <think>tags</think> are text", "", "Later <think>tags</think> are text"),
        ("free", "<think>\ncut short by max_tokens", "cut short by max_tokens", ""),
        ("open", "I should check.\n</think>\n\nThe answer.", "I should check.", "The answer."),
        ("open", "all reasoning, never closed", "all reasoning, never closed", ""),
        ("closed", "<think>x</think>y", "", "<think>x</think>y"),
    ],
)
def test_reasoning_parser(state: str, text: str, reasoning: str, answer: str) -> None:
    for got in split(lambda: ReasoningParser(state), text):
        assert got == (reasoning, answer)


def test_tool_calls_are_read_from_the_answer_only() -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    text = f"<think>\nMaybe {call} is wise.\n</think>\n\n{call}"
    for size in (1, 4, len(text)):
        parser = ResponseParser(ReasoningParser("free"), HermesToolParser({"add"}))
        steps = [parser.feed(text[i : i + size], 1) for i in range(0, len(text), size)]
        steps.append(parser.finish())
        assert "".join(s.reasoning for s in steps) == f"Maybe {call} is wise."
        assert "".join(s.content for s in steps) == ""
        deltas = [d for s in steps for d in s.tool_calls]
        assert deltas[0]["function"]["name"] == "add"
        assert "".join(d["function"].get("arguments", "") for d in deltas) == '{"a": 1}'


def test_reasoning_tokens_count_the_thinking_steps() -> None:
    parser = ResponseParser(ReasoningParser("free"))
    for token in ["<think>", "\n", "Hmm", ",", " yes", "\n", "</think>", "\n\n", "Yes", "."]:
        parser.feed(token, 1)
    parser.finish()
    assert parser.reasoning_tokens == 7  # <think> through </think>
    no_block = ResponseParser(ReasoningParser("free"))
    for token in ["Yes", ".", " Sure"]:
        no_block.feed(token, 1)
    assert no_block.reasoning_tokens == 0


def test_prompt_states_from_templates(sp_tokenizer_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    messages = [{"role": "user", "content": "Hi"}]

    def state(source: str, **args: Any) -> str:
        request = ChatRequest(model="m", messages=messages, chat_template=source, **args)
        return prompt_thinking_state(render_prompt(tokenizer, request))

    assert state(template("hermes.jinja")) == "free"
    assert (
        state(template("hermes.jinja"), chat_template_args={"enable_thinking": False}) == "closed"
    )
    assert state(template("deepseek_r1.jinja")) == "open"
    assert resolve_reasoning("auto", template("hermes.jinja"))
    assert resolve_reasoning("auto", template("deepseek_r1.jinja"))
    assert not resolve_reasoning("auto", template("llama3.jinja"))
    assert not resolve_reasoning("none", template("hermes.jinja"))
    assert resolve_reasoning("qwen3", None)
    with pytest.raises(ValueError, match="unknown reasoning_parser"):
        resolve_reasoning("o1", None)
    off = OutputFormats(tokenizer, "auto", "none")
    assert off.plan(plan_tools(None, None, True), "", template("hermes.jinja")).thinking is None


# --------------------------------------------------------------------------- served


def forced(text: str) -> dict[str, Any]:
    return {"type": "grammar", "grammar": f"root ::= {json.dumps(text)}"}


def ask(**fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Is 7 prime?"}]
    return {"model": "m", "messages": messages, "temperature": 1, "max_tokens": 200, **fields}


def joined(events: list[Any]) -> tuple[str, str, dict]:
    chunks = [e for e in events if isinstance(e, dict)]
    deltas = [e["choices"][0]["delta"] for e in chunks if e["choices"]]
    return (
        "".join(d.get("reasoning_content") or "" for d in deltas),
        "".join(d.get("content") or "" for d in deltas),
        chunks[-1].get("usage", {}),
    )


def test_thinking_goes_to_reasoning_content(services) -> None:
    service = services("hermes")
    body = ask(response_format=forced("<think>\nSeven has no divisors.\n</think>\n\nYes."), seed=5)
    # One after the other, seeded: the same tokens both times.
    whole = answer_all(service, [body])[0]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = answer_all(service, [stream])[0]
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "Seven has no divisors."
    assert message["content"] == "Yes."
    usage = whole["usage"]
    thinking = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < thinking < usage["completion_tokens"]
    assert joined(events) == ("Seven has no divisors.", "Yes.", usage)


def test_enable_thinking_false_is_passed_to_the_template(services) -> None:
    service = services("hermes")
    body = ask(response_format=forced("Yes."), chat_template_args={"enable_thinking": False})
    prompt = render_prompt(service.frontend.tokenizer, ChatRequest.model_validate(body))
    assert prompt.endswith("<think>\n\n</think>\n\n")
    message = answer_all(service, [body])[0]["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Yes.", "reasoning_content": None}


def test_a_prompt_that_opens_thinking(services) -> None:
    # DeepSeek-R1's template ends the prompt inside <think>: the output starts thinking.
    service = services("hermes")
    r1 = template("deepseek_r1.jinja")
    body = ask(chat_template=r1, response_format=forced("Seven is prime.\n</think>\n\nYes."))
    message = answer_all(service, [body])[0]["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Seven is prime.", "Yes.")
    # Cut off while thinking: everything is reasoning, every token a reasoning token.
    whole = answer_all(service, [ask(chat_template=r1, max_tokens=12, ignore_eos=True)])[0]
    assert whole["choices"][0]["message"]["content"] == ""
    assert whole["choices"][0]["message"]["reasoning_content"]
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 12


def test_thinking_then_a_tool_call(services) -> None:
    service = services("hermes")
    tools = [{"type": "function", "function": {"name": "is_prime", "parameters": {}}}]
    text = '<think>\nBetter ask.\n</think>\n\n<tool_call>\n{"name": "is_prime", "arguments": {"n": 7}}\n</tool_call>'
    body = ask(tools=tools, response_format=forced(text))
    whole, events = answer_all(service, [body, {**body, "stream": True}])
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == "Better ask."
    assert choice["message"]["content"] is None
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "is_prime", "arguments": '{"n": 7}'}
    ]
    reasoning, content, _ = joined(events)
    assert (reasoning, content) == ("Better ask.", "")


THINK_FRAGMENTS = [
    "<think>", "</think>", "<thi", "</th", "\n", " ", "a", "é", "<tool_call>", "</tool_call>",
    '{"name": "add", "arguments": {"a": 1}}',
]  # fmt: skip


@settings(max_examples=200, deadline=None, database=None)
@given(
    parts=st.lists(st.sampled_from(THINK_FRAGMENTS), max_size=12),
    state=st.sampled_from(["free", "open", "closed"]),
    size=st.integers(1, 7),
)
def test_any_text_splits_the_same_however_it_streams(parts, state, size) -> None:
    text = "".join(parts)

    def run(step: int) -> tuple[str, str, list[tuple[str, str]]]:
        parser = ResponseParser(ReasoningParser(state), HermesToolParser({"add"}))
        steps = [parser.feed(text[i : i + step]) for i in range(0, len(text), step)]
        steps.append(parser.finish())
        calls = join_tool_calls([d for s in steps for d in s.tool_calls])
        return (
            "".join(s.reasoning for s in steps),
            "".join(s.content for s in steps),
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls],
        )

    assert run(size) == run(max(1, len(text)))


@pytest.mark.parametrize("gathered", [2, 3, 4, 7])
def test_reasoning_tokens_do_not_depend_on_how_outputs_were_gathered(gathered: int) -> None:
    """stream_interval, or a consumer that fell behind, hands the output over several
    tokens at a time: the text, the reasoning and reasoning_tokens are the same as one
    token at a time (a gathered output that closes the block is taken token by token)."""
    from flashserve.api.frontend.options import GenerationOptions
    from flashserve.api.frontend.output.output_plan import ParsingPlan
    from flashserve.api.frontend.output.text_output import TextOutput
    from flashserve.api.frontend.output.token_text import TokenText
    from flashserve.engine.sequence import SequenceOutput
    from tests.chat_harness import EMBEDDED_MODEL

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL))
    ids = tokenizer.encode(
        "<think>\nSeven has no divisors but one and itself.\n</think>\n\nYes, it is.",
        add_special_tokens=False,
    )

    def run(size: int) -> tuple[str, str, int, int]:
        output = TextOutput(
            tokenizer, TokenText(tokenizer), GenerationOptions(), [], ParsingPlan(thinking="free")
        )
        text = reasoning = ""
        for start in range(0, len(ids), size):
            last = start + size >= len(ids)
            chunk = ids[start : start + size]
            piece = output.step(
                SequenceOutput("r", chunk, last, "length" if last else None, num_prompt_tokens=3)
            )
            text, reasoning = text + piece.text, reasoning + piece.reasoning
        assert piece.finish_reason == "length" and piece.completion_tokens == len(ids)
        return text, reasoning, piece.reasoning_tokens, piece.completion_tokens

    one_by_one = run(1)
    assert one_by_one[:2] == ("Yes, it is.", "Seven has no divisors but one and itself.")
    assert 0 < one_by_one[2] < len(ids)
    assert run(gathered) == one_by_one
