"""/v1/responses with thinking: reasoning.effort switches the model's thinking, a
reasoning item before the message (body and events), and reasoning sent back (as
content or encrypted_content) reaching the template. Over the tiny Qwen3-style
"hermes" model (tests/tool_models.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from flashserve.api.endpoints.base import first_or_error
from flashserve.api.endpoints.responses import ResponsesEndpoint
from flashserve.api.endpoints.responses_format import PreparedResponse
from flashserve.engine.structured import EBNF, GrammarSpec
from tests.responses_support import final, output_text, parse_events, without_ids

pytest_plugins = ["tests.tokenizer_fixtures", "tests.tool_fixtures"]


# --------------------------------------------------------------------------- reasoning


def forced(endpoint: ResponsesEndpoint, body: dict[str, Any], text: str) -> Any:
    """The endpoint's answer with the model's output forced to `text` (a grammar on the
    prepared request), so the random tiny model writes a reasoning block."""

    async def run() -> Any:
        prepared: PreparedResponse = endpoint.prepare(body)
        spec = GrammarSpec(EBNF, f"root ::= {json.dumps(text)}")
        prepared.generation.params.grammar = endpoint.frontend.structured.compile(spec)
        pieces = endpoint.frontend.generate(prepared.generation)
        first = await first_or_error(pieces)
        response = await endpoint.respond(prepared, first, pieces, None)
        if isinstance(response, dict):
            return response
        chunks = [c.decode() if isinstance(c, bytes) else c async for c in response.body_iterator]
        return parse_events("".join(chunks))

    return asyncio.run(run())


def test_reasoning_effort_switches_thinking(services) -> None:
    hermes = ResponsesEndpoint(services("hermes").frontend)

    def prompt(**fields: Any) -> str:
        generation = hermes.prepare({"input": "Is 7 prime?", **fields}).generation
        return hermes.frontend.tokenizer.decode(generation.prompt_ids)

    for effort in ("none", "minimal"):
        assert prompt(reasoning={"effort": effort}).endswith("<think>\n\n</think>\n\n")
    for effort in ("low", "medium", "high"):
        assert prompt(reasoning={"effort": effort}).endswith("<|im_start|>assistant\n")
    assert prompt().endswith("<|im_start|>assistant\n")  # the model's default: thinking


def test_reasoning_item_then_message(services) -> None:
    hermes = ResponsesEndpoint(services("hermes").frontend)
    text = "<think>\nSeven has no divisors.\n</think>\n\nYes."
    body = {"input": "Is 7 prime?", "max_output_tokens": 100, "temperature": 1, "seed": 5}
    whole = forced(hermes, body, text)
    reasoning, message = whole["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Seven has no divisors."}]
    assert output_text(whole) == "Yes." and message["status"] == "completed"
    usage = whole["usage"]
    assert 0 < usage["output_tokens_details"]["reasoning_tokens"] < usage["output_tokens"]

    events = forced(hermes, {**body, "stream": True}, text)
    kinds = [e["type"] for e in events]
    thinking = kinds.count("response.reasoning_text.delta")
    answering = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * thinking,
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * answering,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert without_ids(final(events)) == without_ids(whole)

    # Sent back, the reasoning is the assistant turn's reasoning_content for the template.
    follow = {"input": [{"role": "user", "content": "Is 7 prime?"}, *whole["output"]]}
    sent_back = hermes.prepare(follow).generation.prompt_ids
    prompt = hermes.frontend.tokenizer.decode(sent_back)
    assert "<think>\nSeven has no divisors.\n</think>\n\nYes.<|im_end|>" in prompt

    # include reasoning.encrypted_content: a client that keeps no state sends only that.
    sealed = forced(hermes, {**body, "include": ["reasoning.encrypted_content"]}, text)
    reasoning = sealed["output"][0]
    assert reasoning["encrypted_content"] and reasoning["content"] == whole["output"][0]["content"]
    opaque = {
        "type": "reasoning",
        "summary": [],
        "encrypted_content": reasoning["encrypted_content"],
    }
    follow = {"input": [{"role": "user", "content": "Is 7 prime?"}, opaque, sealed["output"][1]]}
    assert hermes.prepare(follow).generation.prompt_ids == sent_back
