"""Which parsers a model's output needs, and the per-request plan for them.

`OutputFormats` (one per served model) knows the model's tool-call format and whether
it thinks, from config.yaml or its chat template; `prepare` turns one request into its
`ToolPlan` and `ParsingPlan`, which makes the request's `ResponseParser`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flashserve.api.frontend.options import GenerationOptions
from flashserve.api.frontend.output.detokenizer import special_token_ids
from flashserve.api.frontend.output.reasoning import END as THINK_END
from flashserve.api.frontend.output.reasoning import START as THINK_START
from flashserve.api.frontend.output.reasoning import (
    ReasoningParser,
    prompt_thinking_state,
    resolve_reasoning,
)
from flashserve.api.frontend.output.response_parser import ResponseParser
from flashserve.api.frontend.tool_parsers import ToolParser, resolve_tool_parser
from flashserve.api.frontend.tools import NONE, ToolPlan, plan_tools
from flashserve.api.http.errors import RequestError

AUTO = "auto"


@dataclass(frozen=True)
class ParsingPlan:
    """How to parse one request's output."""

    tool_parser: type[ToolParser] | None = None  # None: no tool calls are read
    tool_names: frozenset[str] = frozenset()
    # Each tool's parameters schema (GLM's arguments are typed by it).
    tool_schemas: Mapping[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    max_calls: int | None = None
    thinking: str | None = None  # the prompt's thinking state; None: no reasoning split
    # Special tokens the detokenizer must show: the markup the parsers read.
    keep_special_ids: frozenset[int] = frozenset()

    def new_parser(self) -> ResponseParser:
        reasoning = ReasoningParser(self.thinking) if self.thinking is not None else None
        tools = None
        if self.tool_parser is not None:
            tools = self.tool_parser(self.tool_names, self.max_calls, self.tool_schemas)
        return ResponseParser(reasoning, tools)


class OutputFormats:
    """A model's tool-call format and reasoning tags: as configured (`tool_call_parser`,
    `reasoning_parser` in model_metadata.engine) or, with "auto", as its chat template
    shows them. A request's own chat_template is judged the same way."""

    def __init__(
        self,
        tokenizer: Any,
        tool_call_parser: str | None = AUTO,
        reasoning_parser: str | None = AUTO,
    ) -> None:
        self.tokenizer = tokenizer
        self._tool_setting = tool_call_parser
        self._reasoning_setting = reasoning_parser
        template = default_chat_template(tokenizer)
        # Resolved now so that a bad setting fails the load, not the first request.
        self.tool_parser = resolve_tool_parser(tool_call_parser, template)
        self.reasoning = resolve_reasoning(reasoning_parser, template)
        self._special = special_token_ids(tokenizer)
        self._single: dict[str, int | None] = {}

    def prepare(
        self, request: GenerationOptions, prompt: str, chat_template: str | None = None
    ) -> tuple[ToolPlan, ParsingPlan, frozenset[int]]:
        """The request's tool plan, how to parse its output, and the tokens to ban: under
        tool_choice "none" those that open a call. A forced call that this model has no
        format for, or that competes with response_format, is a 400. `chat_template` is
        the request's own template, if it brought one."""
        tools = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
        parsing = self.plan(tools, prompt, chat_template)
        banned: frozenset[int] = frozenset()
        if tools.constrained:
            if parsing.tool_parser is None:
                raise RequestError(
                    f"tool_choice {_choice_text(request.tool_choice)} needs the model's "
                    "tool-call format, and this model has none configured (set "
                    "tool_call_parser in model_metadata.engine)",
                    param="tool_choice",
                )
            kind = (request.response_format or {}).get("type", "text")
            if kind != "text":
                raise RequestError(
                    f"tool_choice {_choice_text(request.tool_choice)} forces a tool call, "
                    f"which response_format {kind!r} would forbid: send one or the other",
                    param="tool_choice",
                )
        elif tools.choice == NONE and tools.tools:
            banned = self.start_marker_ids(chat_template)
        return tools, parsing, banned

    def plan(self, tools: ToolPlan, prompt: str, chat_template: str | None = None) -> ParsingPlan:
        tool_parser, reasoning = self.tool_parser, self.reasoning
        if chat_template:
            tool_parser = resolve_tool_parser(self._tool_setting, chat_template)
            reasoning = resolve_reasoning(self._reasoning_setting, chat_template)
        if not tools.parses_calls:
            tool_parser = None
        markers: tuple[str, ...] = tool_parser.markers if tool_parser is not None else ()
        if reasoning:
            markers += (THINK_START, THINK_END)
        return ParsingPlan(
            tool_parser=tool_parser,
            tool_names=frozenset(tool.name for tool in tools.tools),
            tool_schemas={tool.name: tool.parameters for tool in tools.tools},
            max_calls=tools.max_calls,
            thinking=prompt_thinking_state(prompt) if reasoning else None,
            keep_special_ids=frozenset(
                i for i in self.single_tokens(markers) if i in self._special
            ),
        )

    def start_marker_ids(self, chat_template: str | None = None) -> frozenset[int]:
        """Single-token markers that open a call, for banning under tool_choice none."""
        parser = self.tool_parser
        if chat_template:
            parser = resolve_tool_parser(self._tool_setting, chat_template)
        return frozenset(self.single_tokens(parser.start_markers if parser else ()))

    def single_tokens(self, texts: tuple[str, ...]) -> list[int]:
        """Ids of the markers that the tokenizer has as one token (cached: per request)."""
        out = []
        for text in texts:
            if text not in self._single:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                self._single[text] = ids[0] if len(ids) == 1 else None
            token = self._single[text]
            if token is not None:
                out.append(token)
        return out


def _choice_text(choice: Any) -> str:
    if isinstance(choice, dict):
        return f"function {choice.get('function', {}).get('name')!r}"
    return repr(choice)


def default_chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template; of several named ones, the tool-use one if any."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return template.get("tool_use") or template.get("default")
    return template
