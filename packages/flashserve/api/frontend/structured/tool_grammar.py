"""`tool_choice: required` or a named function -> the grammar that forces such calls.

The grammar is an xgrammar structural tag in the model's own tool-call format (each
parser's `call_format`), with each tool's arguments constrained by its `parameters`
schema, so the output is always a well-formed call of an allowed tool whose arguments
validate. It compiles through the structured-outputs machinery (frontend/structured/response_format.py:
off the event loop, cached by content) and travels in `SamplingParams.grammar`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import threading
from typing import Any

import torch

from flashserve.api.frontend.output.detokenizer import special_token_ids
from flashserve.api.frontend.output.reasoning import START as THINK_START
from flashserve.api.frontend.structured.json_grammar import bound_strings
from flashserve.api.frontend.structured.response_format import StructuredOutputs
from flashserve.api.frontend.structured.thinking import FREE, OPEN, ThinkingFormats, layout
from flashserve.api.frontend.tool_parsers import ToolParser
from flashserve.api.frontend.tool_parsers.base import sequence
from flashserve.api.frontend.tools import ToolPlan
from flashserve.api.http.errors import RequestError
from flashserve.engine.structured import (
    STRUCTURAL_TAG,
    GrammarSpec,
    InvalidGrammarError,
    StructuredGrammar,
    clean_xgrammar_message,
)


class ToolGrammars:
    """Builds and compiles forced-call grammars for one model and tokenizer."""

    def __init__(self, tokenizer: Any, structured: StructuredOutputs) -> None:
        self.tokenizer = tokenizer
        self.structured = structured
        self._special = special_token_ids(tokenizer)
        self.thinking = ThinkingFormats(tokenizer)
        self._rows: dict[frozenset[int], torch.Tensor | None] = {}
        self._lock = threading.Lock()

    def spec(self, parser: type[ToolParser], plan: ToolPlan, thinking: str | None) -> GrammarSpec:
        """The structural tag forcing the plan's calls; `thinking` is the prompt's
        reasoning state (see frontend/output/reasoning.py), None for models that do not think."""
        tools = []
        for tool in plan.callable_tools:
            try:
                tools.append((tool.name, parser.arguments_format(tool.parameters, json_format)))
            except InvalidGrammarError as exc:
                param = f"tools[{plan.tools.index(tool)}].function.parameters"
                raise RequestError(
                    f"'{param}' cannot be turned into a grammar: {exc}",
                    param=param,
                    code="invalid_request",
                ) from exc
        parallel = plan.parallel and plan.forced is None
        body = parser.call_format(tools, parallel, self.literal)
        if thinking == OPEN:  # the prompt opened the block: finish it first
            body = sequence(self.thinking.block(""), layout(), body)
        elif thinking == FREE:  # the model may think first
            # GLM puts a newline before "<think>" (its prompt ends "<|assistant|>").
            body = sequence(
                layout(),
                {"type": "optional", "content": self.thinking.block(THINK_START)},
                layout(),
                body,
            )
        tag = {"type": "structural_tag", "format": body}
        return GrammarSpec(STRUCTURAL_TAG, json.dumps(tag, separators=(",", ":")))

    def literal(self, text: str) -> dict[str, Any]:
        """Fixed markup: its special token where the tokenizer has one, else the text."""
        return self.thinking.literal(text)

    def compile(
        self,
        parser: type[ToolParser],
        plan: ToolPlan,
        thinking: str | None,
        kept_special: frozenset[int],
    ) -> StructuredGrammar:
        """The compiled grammar forcing the plan's calls. Building the arguments grammars
        and compiling block: call it off the event loop (large schemas stall no request)."""
        spec = self.spec(parser, plan, thinking)
        try:
            grammar = self.structured.compiler().compile(spec)
        except InvalidGrammarError as exc:
            raise RequestError(
                f"The tools' parameter schemas cannot be turned into a grammar: {exc}",
                param="tools",
                code="invalid_request",
            ) from exc
        # Special tokens stay banned (their text would vanish from the detokenized
        # output), except the format's own markers, which the grammar places itself.
        return dataclasses.replace(grammar, allowed=self._allowed_row(kept_special))

    def _allowed_row(self, kept_special: frozenset[int]) -> torch.Tensor | None:
        with self._lock:
            if kept_special not in self._rows:
                compiler = self.structured.compiler()
                self._rows[kept_special] = compiler.allowed_row(set(self._special - kept_special))
            return self._rows[kept_special]


def arguments_format(parameters: dict[str, Any]) -> dict[str, Any]:
    """A structural-tag format for arguments that validate against `parameters`."""
    return json_format(parameters)


def json_format(schema: dict[str, Any], arguments: bool = True) -> dict[str, Any]:
    """A structural-tag format for compact JSON that validates against `schema`: call
    arguments (an object) or, with `arguments=False`, a value of any type (GLM's typed
    argument values)."""
    return {
        "type": "grammar",
        "grammar": _json_grammar(json.dumps(schema, sort_keys=False), arguments),
    }


@functools.lru_cache(maxsize=256)
def _json_grammar(schema_json: str, arguments: bool) -> str:
    import xgrammar as xgr

    schema = json.loads(schema_json)
    if arguments:
        schema = grammar_schema(schema)
    else:
        bound_strings(schema)
    try:
        # Compact JSON (no free whitespace): a weak model could otherwise write spaces
        # until max_tokens; strict: no properties beyond the schema's.
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    except (RuntimeError, ValueError) as exc:
        raise InvalidGrammarError(clean_xgrammar_message(str(exc))) from exc
    return str(grammar)


def grammar_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """The schema the grammar is built from: the tool's own, made to produce objects, with
    length-bounded strings given a pattern.

    xgrammar 0.2.8 lets a string with minLength/maxLength hold raw control characters,
    which no JSON parser accepts; the pattern (characters needing no escape) is a subset
    of what the schema allows, so everything it produces still validates.
    """
    schema = copy.deepcopy(parameters) if parameters else {}
    schema.setdefault("type", "object")
    if schema["type"] == "object":
        schema.setdefault("properties", {})
    bound_strings(schema)
    return schema
