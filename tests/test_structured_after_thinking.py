"""response_format with thinking on: the grammar constrains the answer after </think>.

Unit level, on xgrammar matchers over the Qwen3-style "hermes" tokenizer: reasoning is
free text (JSON-looking text, newlines, a stray "<think>" included) and the answer
after "</think>" must match the format, for json_schema, json_object, grammar and
structural_tag, in both thinking states (the prompt opened the block; the model may
open one). With thinking off the compiled grammar is the one used before.

Served, over the tiny random hermes model: DeepSeek-R1's template opens the block, so
every answer reasons first; the content parses as the format, streamed equals whole,
max_tokens inside the block ends the request cleanly, and forced tool calls still work.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.prompt import render_prompt
from flashserve.api.frontend.structured.response_format import (
    StructuredOutputs,
    parse_response_format,
)
from flashserve.api.http.errors import RequestError
from tests.structured_catalogue import (
    GRAMMARS,
    SCHEMAS,
    STRUCTURAL_TAG,
    check_output,
    schema_format,
)
from tests.structured_harness import closing_bias
from tests.tool_models import answer_all, family_tokenizer, template

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"prime": {"type": "boolean"}, "why": {"enum": ["no divisors", "even"]}},
    "required": ["prime", "why"],
    "additionalProperties": False,
}

# (request id for check_output, response_format, an answer that matches it)
FORMATS: list[tuple[str, dict[str, Any], str]] = [
    ("schema:enums:0", schema_format("enums"), '{"color": "red", "size": 1}'),
    ("object:0", {"type": "json_object"}, '{"a": [1, 2]}'),
    (
        "grammar:arithmetic:0",
        {"type": "grammar", "grammar": GRAMMARS["arithmetic"][0]},
        "(3 + 4) - 5",
    ),
    (
        "tag:0",
        {"type": "structural_tag", "structural_tag": json.dumps(STRUCTURAL_TAG)},
        "Result: <time>12:30</time>",
    ),
]
FORMAT_IDS = [rid.split(":")[0] for rid, _, _ in FORMATS]

# Reasoning that a grammar applied from the first token would refuse.
REASONING = '\nLet me see: {"color": "red"} is JSON, <think> is a tag, </thi is not.\n'


@pytest.fixture(scope="module")
def structured(sp_tokenizer_dir) -> StructuredOutputs:
    tokenizer = family_tokenizer("hermes", sp_tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return StructuredOutputs(tokenizer, len(tokenizer), (eos,))


def run(structured: StructuredOutputs, grammar: Any, text: str) -> tuple[bool, bool]:
    """(all of `text` accepted, the grammar then takes the stop token and terminates)."""
    matcher = grammar.new_matcher()
    if not matcher.accept_string(text):
        return False, False
    eos = structured.stop_token_ids[0]
    return True, matcher.accept_token(eos) and matcher.is_terminated()


@pytest.mark.parametrize(("rid", "response_format", "answer"), FORMATS, ids=FORMAT_IDS)
def test_thinking_off_compiles_the_grammar_as_before(structured, rid, response_format, answer):
    plain = structured.compile(parse_response_format(response_format))
    for state in (None, "closed"):
        grammar = structured.grammar_for(response_format, state)
        assert grammar is plain  # the same cached grammar, mask row and all
    assert run(structured, plain, answer) == (True, True)
    assert run(structured, plain, f"<think>{REASONING}</think>\n\n{answer}")[0] is False


@pytest.mark.parametrize(("rid", "response_format", "answer"), FORMATS, ids=FORMAT_IDS)
def test_prompt_opened_block_reasoning_first(structured, rid, response_format, answer):
    grammar = structured.grammar_for(response_format, "open")
    assert run(structured, grammar, f"{REASONING}</think>\n\n{answer}") == (True, True)
    assert run(structured, grammar, f"</think>{answer}") == (True, True)  # no reasoning
    # The block must close before the answer; reasoning cannot close it twice.
    assert run(structured, grammar, answer) != (True, True)
    assert run(structured, grammar, f"{REASONING}</think>\n\n</think>{answer}")[0] is False
    # No stop token before the answer is complete.
    assert run(structured, grammar, f"{REASONING}</think>\n\n") == (True, False)


@pytest.mark.parametrize(("rid", "response_format", "answer"), FORMATS, ids=FORMAT_IDS)
def test_model_may_open_a_block(structured, rid, response_format, answer):
    grammar = structured.grammar_for(response_format, "free")
    assert run(structured, grammar, f"<think>{REASONING}</think>\n\n{answer}") == (True, True)
    assert run(structured, grammar, f"\n<think>{REASONING}</think>{answer}") == (True, True)
    assert run(structured, grammar, answer) == (True, True)  # no block at all
    assert run(structured, grammar, f"\n\n{answer}")[0] is False  # the answer starts at once
    assert run(structured, grammar, f"{REASONING}{answer}")[0] is False  # no tags: no reasoning


def test_a_grammar_that_spells_the_block_applies_from_the_first_token(structured):
    response_format = {"type": "grammar", "grammar": 'root ::= "<think>x</think>yes"'}
    grammar = structured.grammar_for(response_format, "free")
    assert grammar.spec == parse_response_format(response_format)
    assert run(structured, grammar, "<think>x</think>yes") == (True, True)


def test_bad_grammar_after_thinking_names_its_field(structured):
    with pytest.raises(RequestError) as caught:
        structured.grammar_for({"type": "grammar", "grammar": "root ::= undefined_rule"}, "open")
    assert caught.value.param == "response_format.grammar"


# --------------------------------------------------------------------------- served

R1 = template("deepseek_r1.jinja")


def ask(service: Any, **fields: Any) -> dict[str, Any]:
    """A seeded request with the R1 template (the prompt opens <think>), "</think>" made
    likely enough that the random model closes its block after a few tokens, and tokens
    that close JSON strings and objects favoured (as in tests/structured_harness.py)."""
    tokenizer = service.frontend.tokenizer
    bias = {str(i): value for i, value in closing_bias(tokenizer).items()}
    bias[str(tokenizer.convert_tokens_to_ids("</think>"))] = 10.0
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Is 7 prime?"}],
        "chat_template": R1,
        "temperature": 1,
        "seed": 3,
        "max_tokens": 150,
        "logit_bias": bias,
        **fields,
    }


def streamed(service: Any, body: dict[str, Any]) -> tuple[str, str, str | None]:
    events = answer_all(service, [{**body, "stream": True}])[0]
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    return (
        "".join(d.get("reasoning_content") or "" for d in deltas),
        "".join(d.get("content") or "" for d in deltas),
        chunks[-1]["choices"][0]["finish_reason"],
    )


@pytest.mark.parametrize(("rid", "response_format", "answer"), FORMATS, ids=FORMAT_IDS)
def test_served_answer_follows_the_format_after_reasoning(services, rid, response_format, answer):
    service = services("hermes")
    body = ask(service, response_format=response_format)
    whole = answer_all(service, [body])[0]
    choice = whole["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "stop", message
    assert message["reasoning_content"], message
    check_output(rid, message["content"])
    assert streamed(service, body) == (message["reasoning_content"], message["content"], "stop")


def test_served_json_schema_after_reasoning_validates(services):
    service = services("hermes")
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "prime", "schema": ANSWER_SCHEMA, "strict": True},
    }
    message = answer_all(service, [ask(service, response_format=response_format)])[0]["choices"][0][
        "message"
    ]
    assert message["reasoning_content"]
    jsonschema.validate(json.loads(message["content"]), ANSWER_SCHEMA)


def test_max_tokens_inside_the_block_ends_cleanly(services):
    service = services("hermes")
    body = ask(service, response_format=schema_format("enums"), max_tokens=6, logit_bias={})
    whole = answer_all(service, [body])[0]
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""
    assert choice["message"]["reasoning_content"]
    assert whole["usage"]["completion_tokens"] == 6
    assert streamed(service, body) == (choice["message"]["reasoning_content"], "", "length")
    # The engine is whole: the next request is served.
    assert answer_all(service, [ask(service, max_tokens=2)])[0]["choices"][0]["finish_reason"]


def test_thinking_off_serves_the_format_from_the_first_token(services):
    service = services("hermes")
    body = ask(
        service,
        chat_template=None,
        chat_template_args={"enable_thinking": False},
        response_format=schema_format("enums"),
    )
    message = answer_all(service, [body])[0]["choices"][0]["message"]
    assert message["reasoning_content"] is None
    jsonschema.validate(json.loads(message["content"]), SCHEMAS["enums"])


def test_forced_tool_call_with_thinking_on(services):
    service = services("hermes")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "is_prime",
                "parameters": {
                    "type": "object",
                    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                    "required": ["n"],
                },
            },
        }
    ]
    body = ask(service, chat_template=None, tools=tools, tool_choice="required")
    choice = answer_all(service, [body])[0]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"][:1]
    assert call["function"]["name"] == "is_prime"
    assert 0 <= json.loads(call["function"]["arguments"])["n"] <= 99


def test_thinking_budget_then_the_format(services):
    """A thinking budget (Anthropic's budget_tokens) ends the block; the answer that
    follows is constrained as after a closed block."""
    service = services("hermes")
    frontend = service.frontend
    body = ask(service, response_format=schema_format("enums"), logit_bias={})
    request = ChatRequest.model_validate(body)
    text = render_prompt(frontend.tokenizer, request)
    ids = frontend.tokenize(text, request, param="messages")
    generation = frontend.build(request, "budget", text, ids, chat_template=R1, thinking_budget=5)

    async def collect() -> list[Any]:
        return [piece async for piece in frontend.generate(generation)]

    pieces = asyncio.run(collect())
    assert pieces[-1].finish_reason == "stop"
    assert "".join(p.reasoning for p in pieces)
    answer = "".join(p.text for p in pieces)
    jsonschema.validate(json.loads(answer), SCHEMAS["enums"])
