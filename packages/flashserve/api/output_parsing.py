"""One response's generated text -> content, reasoning and tool-call deltas.

Sits between the detokenizer (after stop strings) and the response builders. Reasoning
is split off first, so a tool call written while thinking stays part of the thinking;
tool calls are read from the answer only. Both parsers are optional; with neither, the
text passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashserve.api.detokenizer import special_token_ids
from flashserve.api.errors import RequestError
from flashserve.api.protocol import ChatRequest
from flashserve.api.reasoning import END as THINK_END
from flashserve.api.reasoning import START as THINK_START
from flashserve.api.reasoning import ReasoningParser, prompt_thinking_state, resolve_reasoning
from flashserve.api.tool_parsers import ParsedText, ToolParser, resolve_tool_parser
from flashserve.api.tools import NONE, ToolPlan, plan_tools
from flashserve.engine.sampling_params import SamplingParams

AUTO = "auto"


@dataclass
class ParsedStep:
    content: str = ""
    reasoning: str = ""
    # OpenAI tool-call deltas: {index, id?, type?, function: {name?, arguments?}}.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: ParsedStep) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        for delta in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last["index"] == delta["index"] and "id" not in delta:
                function = last["function"]
                function["arguments"] = function.get("arguments", "") + delta["function"].get(
                    "arguments", ""
                )
            else:
                self.tool_calls.append(delta)


class ResponseParser:
    def __init__(
        self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None
    ) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.reasoning_tokens = 0

    @property
    def has_reasoning(self) -> bool:
        return self.reasoning is not None

    @property
    def called_tools(self) -> bool:
        return self.tools is not None and self.tools.num_calls > 0

    @property
    def exhausted(self) -> bool:
        """The allowed number of tool calls is complete: generation can stop."""
        return self.tools is not None and self.tools.exhausted

    def feed(self, text: str, num_tokens: int = 0) -> ParsedStep:
        """Parse one step's text; its `num_tokens` count as reasoning tokens when the
        step was (partly) thinking."""
        if self.reasoning is None:
            return self._answer(text, final=False)
        was_thinking = self.reasoning.in_block
        thought, answer = self.reasoning.feed(text)
        # Token-exact when steps are single tokens (decode); a step that opens or closes
        # the block counts whole, since the tag tokens themselves are part of thinking.
        if was_thinking or self.reasoning.in_block or thought:
            self.reasoning_tokens += num_tokens
        step = self._answer(answer, final=False)
        step.reasoning = thought
        return step

    def finish(self) -> ParsedStep:
        """The response ended (or was cut short): release everything held back."""
        thought = answer = ""
        if self.reasoning is not None:
            thought, answer = self.reasoning.finish()
        step = self._answer(answer, final=True)
        step.reasoning = thought
        return step

    def _answer(self, text: str, final: bool) -> ParsedStep:
        if self.tools is None:
            return ParsedStep(content=text)
        parsed = ParsedText()
        if text:
            parsed.extend(self.tools.feed(text))
        if final:
            parsed.extend(self.tools.finish())
        return ParsedStep(
            content=parsed.content, tool_calls=[delta.to_openai() for delta in parsed.calls]
        )


@dataclass(frozen=True)
class ParsingPlan:
    """How to parse one request's output."""

    tool_parser: type[ToolParser] | None = None  # None: no tool calls are read
    tool_names: frozenset[str] = frozenset()
    max_calls: int | None = None
    thinking: str | None = None  # the prompt's thinking state; None: no reasoning split
    # Special tokens the detokenizer must show: the markup the parsers read.
    keep_special_ids: frozenset[int] = frozenset()

    def new_parser(self) -> ResponseParser:
        reasoning = ReasoningParser(self.thinking) if self.thinking is not None else None
        tools = None
        if self.tool_parser is not None:
            tools = self.tool_parser(self.tool_names, self.max_calls)
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

    def prepare(
        self, request: ChatRequest, prompt: str, params: SamplingParams
    ) -> tuple[ToolPlan, ParsingPlan]:
        """The request's tool plan and how to parse its output. Under tool_choice "none"
        the tokens that open a call are banned; a forced call that this model has no
        format for, or that competes with response_format, is a 400."""
        tools = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
        parsing = self.plan(request, tools, prompt)
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
            banned = self.start_marker_ids(request)
            if banned:
                params.bad_token_ids = tuple(sorted(set(params.bad_token_ids) | banned))
        return tools, parsing

    def plan(self, request: ChatRequest, tools: ToolPlan, prompt: str) -> ParsingPlan:
        tool_parser, reasoning = self.tool_parser, self.reasoning
        if request.chat_template:
            tool_parser = resolve_tool_parser(self._tool_setting, request.chat_template)
            reasoning = resolve_reasoning(self._reasoning_setting, request.chat_template)
        if not tools.parses_calls:
            tool_parser = None
        markers: tuple[str, ...] = tool_parser.markers if tool_parser is not None else ()
        if reasoning:
            markers += (THINK_START, THINK_END)
        return ParsingPlan(
            tool_parser=tool_parser,
            tool_names=frozenset(tool.name for tool in tools.tools),
            max_calls=tools.max_calls,
            thinking=prompt_thinking_state(prompt) if reasoning else None,
            keep_special_ids=frozenset(
                i for i in self.single_tokens(markers) if i in self._special
            ),
        )

    def start_marker_ids(self, request: ChatRequest) -> frozenset[int]:
        """Single-token markers that open a call, for banning under tool_choice none."""
        parser = self.tool_parser
        if request.chat_template:
            parser = resolve_tool_parser(self._tool_setting, request.chat_template)
        return frozenset(self.single_tokens(parser.start_markers if parser else ()))

    def single_tokens(self, texts: tuple[str, ...]) -> list[int]:
        out = []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                out.append(ids[0])
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
