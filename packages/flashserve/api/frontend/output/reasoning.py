"""Reasoning output: `<think>…</think>` goes to `reasoning_content`, the rest to `content`.

Qwen3, QwQ and DeepSeek-R1 style models think inside `<think>` tags before answering.
Three starts are possible, told apart by the rendered prompt:
* the prompt ends inside an open block (DeepSeek-R1's template appends "<think>\\n"):
  the output is reasoning until "</think>";
* the prompt ends with a closed, empty block (Qwen3 with `enable_thinking: false`):
  the output is all answer;
* otherwise the output may open a block itself, as its very first thing.
Whitespace just inside the tags and between "</think>" and the answer is layout, dropped.
"""

from __future__ import annotations

from flashserve.api.frontend.output.markup import WhitespaceGate, safe_prefix_len

START, END = "<think>", "</think>"

REASONING_PARSERS = ("think", "qwen3", "deepseek_r1")
AUTO = "auto"
DISABLED = ("none", "", None)

_MAYBE = "maybe"  # at the start: a block may open
_THINKING = "thinking"
_ANSWER = "answer"


def resolve_reasoning(setting: str | None, chat_template: str | None) -> bool:
    """Whether to split reasoning for a `reasoning_parser` setting ("auto": when the chat
    template knows the tags)."""
    if setting in DISABLED:
        return False
    if setting == AUTO:
        return bool(chat_template) and END in chat_template
    if setting in REASONING_PARSERS:
        return True
    raise ValueError(
        f"unknown reasoning_parser {setting!r}: use auto, none or one of "
        + ", ".join(REASONING_PARSERS)
    )


def prompt_thinking_state(prompt: str) -> str:
    """How the rendered prompt leaves thinking: "open" (the output starts inside a block),
    "closed" (thinking was switched off) or "free" (the output may open a block)."""
    tail = prompt.rstrip()
    if tail.endswith(START):
        return "open"
    if tail.endswith(END):
        return "closed"
    return "free"


class ReasoningParser:
    """Splits one response's text into reasoning and answer, chunk by chunk."""

    def __init__(self, prompt_state: str = "free") -> None:
        self._state = {"open": _THINKING, "closed": _ANSWER}.get(prompt_state, _MAYBE)
        self._buffer = ""
        self._reasoning = WhitespaceGate()
        self._reasoning.markup()  # the opening tag: leading whitespace is layout
        self._strip_answer = prompt_state == "open"

    @property
    def in_block(self) -> bool:
        """Inside a reasoning block now."""
        return self._state == _THINKING

    @property
    def settled(self) -> bool:
        """In the answer: no reasoning block can open or close any more."""
        return self._state == _ANSWER

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) text that `text` releases."""
        self._buffer += text
        return self._parse(final=False)

    def finish(self) -> tuple[str, str]:
        reasoning, answer = self._parse(final=True)
        if self._state == _THINKING:
            reasoning += self._reasoning.release()  # cut short inside the block
        return reasoning, answer

    def _parse(self, final: bool) -> tuple[str, str]:
        reasoning = answer = ""
        if self._state == _MAYBE:
            stripped = self._buffer.lstrip()
            if stripped.startswith(START):
                self._buffer = stripped[len(START) :]
                self._state, self._strip_answer = _THINKING, True
            elif stripped and (final or not START.startswith(stripped)):
                self._state = _ANSWER
            elif not final:
                return "", ""  # maybe "<think>", split
            else:
                self._state = _ANSWER
        if self._state == _THINKING:
            at = self._buffer.find(END)
            if at < 0:
                keep = len(self._buffer) if final else safe_prefix_len(self._buffer, (END,))
                reasoning = self._reasoning.push(self._buffer[:keep])
                self._buffer = self._buffer[keep:]
                return reasoning, ""
            reasoning = self._reasoning.push(self._buffer[:at])
            self._buffer = self._buffer[at + len(END) :]
            self._state = _ANSWER
        if self._strip_answer:
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return reasoning, ""
            self._strip_answer = False
        answer, self._buffer = self._buffer, ""
        return reasoning, answer
