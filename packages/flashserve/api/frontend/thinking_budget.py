"""A cap on how many tokens a request may spend thinking (Anthropic's `budget_tokens`).

The generation loop (generation.py) watches the reasoning parser token by token while a
budget is set. When the open thinking block holds `tokens` tokens, it ends the engine
request, appends the end-of-thinking tag to the output as if the model had written it,
and continues with a new engine request whose prompt is the original prompt plus the
output so far (prefix caching makes that prefill cheap). The answer is then generated
with the tokens `max_tokens` has left, under the grammar a prompt with closed thinking
gets (a forced tool call without its thinking part). Everything else about the
response (its text, pieces, finish reason) comes from the same TextOutput throughout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flashserve.api.frontend.output.response_parser import ResponseParser

if TYPE_CHECKING:
    from flashserve.api.frontend.generation import GenerationRequest

# (the output's token ids so far, the end tag included; the tokens max_tokens leaves) ->
# the request that continues the answer, or None when the context has no room left.
Resume = Callable[[list[int], int], Awaitable["GenerationRequest | None"]]


@dataclass(frozen=True)
class ThinkingBudget:
    tokens: int
    close_ids: tuple[int, ...]  # the end-of-thinking tag's token ids
    resume: Resume

    def spent(self, parser: ResponseParser) -> bool:
        """The thinking block is still open and holds the whole budget."""
        reasoning = parser.reasoning
        return (
            reasoning is not None and reasoning.in_block and parser.reasoning_tokens >= self.tokens
        )
