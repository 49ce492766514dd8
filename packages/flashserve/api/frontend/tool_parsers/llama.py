"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: `{"name": ..., "parameters": {...}}`.

With custom tools, Llama 3 answers a call with nothing but the JSON object (optionally
after the `<|python_tag|>` special token); several calls are separated by ";". The
format has no start marker, so an answer that starts with "{" is read as a call only
when it names a declared tool; anything else (a JSON answer, say) stays content.
"""

from __future__ import annotations

from typing import Any

from flashserve.api.frontend.tool_parsers.base import (
    CALL_DONE,
    NOT_A_CALL,
    Literal,
    ToolParser,
    json_call_options,
    repeated,
)

PYTHON_TAG = "<|python_tag|>"

_START = "start"  # nothing but whitespace so far: a call may begin
_TEXT = "text"  # plain content from here on (a <|python_tag|> may still open calls)
_CALL = "call"
_NEXT = "next"  # after a call: ";" or "{" for another, anything else is content


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = (PYTHON_TAG,)
    markers = (PYTHON_TAG,)
    argument_keys = ("parameters", "arguments")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._where = _START
        self._tagged = False  # calls opened by <|python_tag|>: any name is a call

    def _accepts(self, name: str) -> bool:
        return self._tagged or name in self.tool_names

    def _parse(self, final: bool) -> None:
        while self._buffer and not self._stopped:
            where = self._where
            if where == _CALL:
                self._read_call()
            elif where == _TEXT:
                self._text(final)
                if self._where == _TEXT:
                    return
            else:
                stripped = self._buffer.lstrip()
                if not stripped:
                    if where == _START:
                        self._content(self._buffer)  # held by the gate, dropped by a call
                    self._buffer = ""
                    return
                if where == _START:
                    self._content(self._buffer[: len(self._buffer) - len(stripped)])
                self._buffer = stripped
                if not self._between_calls(final):
                    return  # waiting for more text

    def _between_calls(self, final: bool) -> bool:
        """Read what starts a call (or shows there is none); False: need more text."""
        buffer, where = self._buffer, self._where
        if where == _NEXT and buffer[0] == ";":
            self._buffer = buffer[1:]
            self._where = _START
        elif buffer[0] == "{":
            self._open_call("")
            self._where = _CALL
        elif buffer.startswith(PYTHON_TAG):
            self._buffer = buffer[len(PYTHON_TAG) :]
            self._tagged = True
            self._gate.markup()
        elif not final and PYTHON_TAG.startswith(buffer):
            return False  # maybe the tag, split
        else:
            self._where = _TEXT
        return True

    def _text(self, final: bool) -> None:
        if self._content_until(PYTHON_TAG, final):
            self._tagged = True
            self._gate.markup()
            self._where = _START

    def _read_call(self) -> None:
        outcome = self._scan_open_call()  # a broken call skips the rest (base.py)
        if outcome == CALL_DONE:
            self._where = _NEXT
        elif outcome == NOT_A_CALL:
            self._where = _TEXT

    @classmethod
    def call_format(
        cls, tools: list[tuple[str, dict[str, Any]]], parallel: bool, literal: Literal
    ) -> dict[str, Any]:
        calls = json_call_options(tools, "parameters")
        return repeated(calls, "; ", parallel)
