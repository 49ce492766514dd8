"""One response's generated text -> content, reasoning and tool-call deltas.

Sits between the detokenizer (after stop strings) and the response builders. Reasoning
is split off first, so a tool call written while thinking stays part of the thinking;
tool calls are read from the answer only. Both parsers are optional; with neither, the
text passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashserve.api.frontend.output.reasoning import ReasoningParser
from flashserve.api.frontend.tool_parsers import ParsedText, ToolParser


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
    def may_think(self) -> bool:
        """A reasoning block may still open or close: tokens then count one by one."""
        return self.reasoning is not None and not self.reasoning.settled

    @property
    def called_tools(self) -> bool:
        return self.tools is not None and self.tools.num_calls > 0

    @property
    def may_exhaust(self) -> bool:
        """Tool calls are capped and the cap is not reached: the text may end at a token."""
        return self.tools is not None and self.tools.max_calls is not None and not self.exhausted

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
        # A step that opens or closes the block counts whole, since the tag tokens
        # themselves are part of thinking: TextOutput feeds single tokens while
        # `may_think`, so the count is token-exact however the outputs were gathered.
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


def join_tool_calls(deltas: list[dict]) -> list[dict]:
    """Tool-call deltas -> complete calls, the way OpenAI clients accumulate a stream."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in deltas:
        function = piece.get("function", {})
        call = calls.get(piece["index"])
        if call is None:
            call = calls[piece["index"]] = {
                "id": piece.get("id"),
                "type": "function",
                "function": {"name": function.get("name"), "arguments": ""},
            }
        call["function"]["arguments"] += function.get("arguments", "")
    return [calls[index] for index in sorted(calls)]
