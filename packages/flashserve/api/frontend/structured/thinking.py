"""Grammars that leave a thinking block free: reasoning first, the constrained part after.

A model whose prompt leaves thinking on (see frontend/output/reasoning.py) writes
`<think>` free text `</think>` before its answer, or, when the prompt already opened the
block, free text up to `</think>`. A grammar for the answer (a response_format, forced
tool calls) must start after that: the structural tag built here puts the block first,
as a tag whose content is any text. The tag ends at the first `</think>`, so reasoning
can never hold the end marker, and stop tokens only come once the answer is complete:
the reasoning is bounded by max_tokens alone.
"""

from __future__ import annotations

import threading
from typing import Any

from flashserve.api.frontend.output.detokenizer import special_token_ids
from flashserve.api.frontend.output.reasoning import END as THINK_END
from flashserve.api.frontend.output.reasoning import START as THINK_START
from flashserve.api.frontend.tool_parsers.base import const, sequence

OPEN = "open"  # the prompt opened the block: the output starts inside it
FREE = "free"  # the output may open a block, as its very first thing


class ThinkingFormats:
    """Structural-tag pieces for one tokenizer: fixed markup as its special token where it
    has one, the thinking block, and an answer format with the block before it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = special_token_ids(tokenizer)
        self._single: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def literal(self, text: str) -> dict[str, Any]:
        """Fixed markup: its special token where the tokenizer has one (a model writes
        "[TOOL_CALLS]" as that token, never as text), else the text."""
        token = self.single_token(text)
        if token is not None and token in self.special:
            return {"type": "token", "token": token}
        return const(text)

    def block(self, begin: str) -> dict[str, Any]:
        """`begin`, free text, then "</think>" (tags as tokens where they are special)."""
        return {
            "type": "tag",
            "begin": self._tag_edge(begin),
            "content": {"type": "any_text"},
            "end": self._tag_edge(THINK_END),
        }

    def after_thinking(self, answer: dict[str, Any], thinking: str | None) -> dict[str, Any]:
        """`answer` preceded by the block the prompt's thinking state allows: after
        `</think>` with the prompt's block open; with thinking free, either a block then the
        answer or the answer alone (its text then starts exactly where the answer does)."""
        if thinking == OPEN:
            return sequence(self.block(""), layout(), answer)
        if thinking == FREE:
            # GLM puts a newline before "<think>" (its prompt ends "<|assistant|>").
            thought = sequence(layout(), self.block(THINK_START), layout())
            return sequence({"type": "optional", "content": thought}, answer)
        return answer

    def special_tags(self) -> frozenset[int]:
        """The think tags that are special tokens: a grammar that places them must not ban them."""
        ids = (self.single_token(THINK_START), self.single_token(THINK_END))
        return frozenset(i for i in ids if i is not None and i in self.special)

    def single_token(self, text: str) -> int | None:
        with self._lock:
            if text not in self._single:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                self._single[text] = ids[0] if len(ids) == 1 else None
            return self._single[text]

    def _tag_edge(self, text: str) -> str | dict[str, Any]:
        edge = self.literal(text) if text else const(text)
        return text if edge["type"] == "const_string" else edge


def layout() -> dict[str, Any]:
    # Qwen3 and R1 put a blank line between "</think>" and the answer.
    return {"type": "regex", "pattern": r"[ \n]{0,2}"}
