"""Mistral tool calls: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

The format of Mistral 7B v0.3, Mixtral 8x22B and Mistral Nemo/Small (v3 tokenizers):
`[TOOL_CALLS]` is a special token, followed by a JSON array of calls (a single object
without the array is accepted too). Text after the array is content again.
"""

from __future__ import annotations

from typing import Any

from flashserve.api.frontend.tool_parsers.base import (
    CALL_DONE,
    NOT_A_CALL,
    Literal,
    ToolParser,
    const,
    json_call_options,
    repeated,
    sequence,
)

MARKER = "[TOOL_CALLS]"

# Where the reader is after the marker.
_LIST = "list"  # expecting "[" (or a bare "{")
_ITEM = "item"  # inside the array, expecting "{" or "]"
_CALL = "call"  # inside a call object
_NEXT = "next"  # after a call in the array: "," or "]"


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = (MARKER,)
    markers = (MARKER,)
    argument_keys = ("arguments",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._where: str | None = None  # None: in text
        self._in_array = False
        self._markup = ""  # the marker and list syntax read so far, for giving it back

    def _parse(self, final: bool) -> None:
        while self._buffer and not self._stopped:
            where = self._where
            if where is None:
                self._text(final)
                if self._where is None:
                    return
                continue
            if where == _CALL:
                self._read_call()
                continue
            stripped = self._buffer.lstrip()
            if not stripped:
                self._markup += self._buffer
                self._buffer = ""
                return
            self._markup += self._buffer[: len(self._buffer) - len(stripped)]
            self._buffer = stripped
            self._punctuation(stripped[0])

    def _text(self, final: bool) -> None:
        if self._content_until(MARKER, final):
            self._where, self._markup, self._in_array = _LIST, MARKER, False

    def _punctuation(self, char: str) -> None:
        """One character of list syntax between calls."""
        where = self._where
        if char == "{" and where in (_LIST, _ITEM):
            self._open_call(self._markup)
            self._markup, self._where = "", _CALL
            return
        if where == _LIST and char == "[":
            self._in_array, self._where = True, _ITEM
        elif where == _NEXT and char == ",":
            self._where = _ITEM
        elif where in (_ITEM, _NEXT) and char == "]":
            self._where = None
            self._gate.markup()
        else:
            self._give_back()
            return
        self._markup += char
        self._buffer = self._buffer[1:]

    def _read_call(self) -> None:
        outcome = self._scan_open_call()  # a broken call skips the rest (base.py)
        if outcome == CALL_DONE:
            self._where = _NEXT if self._in_array else None
        elif outcome == NOT_A_CALL:
            self._where = None

    def _give_back(self) -> None:
        """Not the list syntax: the markup read so far and what follows are content
        (after a call was sent, the broken rest is dropped)."""
        if self.num_calls and self._where == _NEXT:
            self._skip_rest()
            return
        self._content(self._markup)
        self._markup, self._where = "", None

    @classmethod
    def call_format(
        cls, tools: list[tuple[str, dict[str, Any]]], parallel: bool, literal: Literal
    ) -> dict[str, Any]:
        calls = json_call_options(tools, "arguments")
        return sequence(
            literal(MARKER),
            # The model writes "[TOOL_CALLS] [" (a space-prefixed token); allow both.
            {"type": "regex", "pattern": r" ?\["},
            repeated(calls, ", ", parallel),
            const("]"),
        )
