"""DeepSeek tool calls, in special-token markup (the tokens are written out below).

DeepSeek-V3.1 (and V3.2's chat mode, Kimi-style templates derived from it):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>

DeepSeek-V3 (0324) and R1 write the type first and fence the JSON:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Calls follow one another inside the begin/end pair, after optional text. Arguments
stream verbatim (whitespace around them, and V3's fence, dropped). A call tag without the
section tag around it is read too.
"""

from __future__ import annotations

from typing import Any

from flashserve.api.frontend.output.markup import find_marker, safe_prefix_len
from flashserve.api.frontend.tool_parsers.base import Literal, const, one_of, sequence
from flashserve.api.frontend.tool_parsers.tagged import (
    MAX_NAME,
    TaggedCallParser,
    ahead,
    name_breaks_at,
    read_name,
)

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
FENCE = "```"
_WHITESPACE = " \t\r\n"

# Where the reader is.
_TEXT = "text"
_LIST = "list"  # in the calls section: expecting a call or the section's end
_HEAD = "head"  # before <｜tool▁sep｜>: the name (V3.1) or the type (V3)
_NAME = "name"  # V3: the name after <｜tool▁sep｜>
_FENCE = "fence"  # V3: before the fenced JSON
_ARGUMENTS = "arguments"


class DeepSeekV31ToolParser(TaggedCallParser):
    name = "deepseek_v31"
    start_markers = (CALLS_BEGIN, CALL_BEGIN)
    markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
    typed = False  # V3: "function<｜tool▁sep｜>name" and fenced arguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._where = _TEXT
        self._pending = ""  # section markup read before its first call
        self._section_calls = 0  # calls read in the current section
        self._text = ""  # the head or name read so far
        self._held = ""  # argument text held back: maybe trailing whitespace (or fence)
        self._started = False  # argument text has begun

    def _parse(self, final: bool) -> None:
        steps = {
            _TEXT: self._read_text,
            _LIST: self._read_list,
            _HEAD: self._read_head,
            _NAME: self._read_name,
            _FENCE: self._read_fence,
            _ARGUMENTS: self._read_arguments,
        }
        while self._buffer and not (self._stopped or self._skipping):
            if not steps[self._where](final):
                return

    def _read_text(self, final: bool) -> bool:
        buffer = self._buffer
        at, marker = find_marker(buffer, (CALLS_BEGIN, CALL_BEGIN))
        if at < 0:
            keep = len(buffer) if final else safe_prefix_len(buffer, (CALLS_BEGIN, CALL_BEGIN))
            self._content(buffer[:keep])
            self._buffer = buffer[keep:]
            return False
        self._content(buffer[:at])
        self._buffer = buffer[at + len(marker) :]
        self._gate.markup()
        self._section_calls = 0
        if marker == CALLS_BEGIN:
            self._where, self._pending = _LIST, marker
        else:
            self._open(marker)
        return True

    def _read_list(self, final: bool) -> bool:
        buffer = self._buffer
        stripped = buffer.lstrip()
        self._pending += buffer[: len(buffer) - len(stripped)] if self._pending else ""
        self._buffer = stripped
        if not stripped:
            return False
        tag = ahead(stripped, (CALL_BEGIN, CALLS_END), final)
        if tag == "":
            return False
        if tag is None:
            if self._section_calls:
                self._skip_rest()  # calls were sent: the broken rest is dropped
                return False
            self._content(self._pending)  # no call in it: the markup was not one
            self._pending, self._where = "", _TEXT
            return True
        self._buffer = stripped[len(tag) :]
        if tag == CALL_BEGIN:
            self._open(self._pending + tag)
        else:
            if self._pending:  # an empty section: given back as written
                self._content(self._pending + tag)
            self._where = _TEXT
        self._pending = ""
        return True

    def _open(self, opener: str) -> None:
        self._start_call(opener)
        self._where, self._text, self._held, self._started = _HEAD, "", "", False

    def _read_head(self, final: bool) -> bool:
        buffer = self._buffer
        at = buffer.find(SEP)
        part = buffer[:at] if at >= 0 else buffer[: safe_prefix_len(buffer, (SEP,))]
        breaks = name_breaks_at(self._text, part)
        if breaks is not None:  # markup read up to here goes back; the rest is read afresh
            self._markup(part[: breaks + 1])
            self._buffer = buffer[breaks + 1 :]
            self._not_a_call()
            return True
        self._text += part
        self._markup(part)
        self._buffer = buffer[len(part) :]
        head = self._text.strip()
        if at < 0:
            return False
        self._buffer = self._buffer[len(SEP) :]
        self._markup(SEP)
        if not head or (self.typed and head != "function"):
            self._not_a_call()
        elif self.typed:
            self._where, self._text = _NAME, ""
        else:
            self._send_name(head)
            self._where = _ARGUMENTS
        return True

    def _read_name(self, final: bool) -> bool:
        buffer = self._buffer
        size = read_name(buffer)
        self._text += buffer[:size]
        self._markup(buffer[:size])
        self._buffer = buffer[size:]
        if len(self._text) > MAX_NAME or (self._buffer and not self._text):
            self._not_a_call()
            return True
        if not self._buffer:
            return False
        self._send_name(self._text)
        self._where = _FENCE
        return True

    def _read_fence(self, final: bool) -> bool:
        buffer = self._buffer
        stripped = buffer.lstrip()
        self._buffer = stripped
        if not stripped:
            return False
        fence = ahead(stripped, (FENCE + "json", FENCE), final)
        if fence == "":
            return False
        self._buffer = stripped[len(fence or "") :]
        self._where = _ARGUMENTS
        return True

    def _read_arguments(self, final: bool) -> bool:
        buffer = self._buffer
        at = buffer.find(CALL_END)
        part = buffer[:at] if at >= 0 else buffer[: safe_prefix_len(buffer, (CALL_END,))]
        self._buffer = buffer[len(part) :]
        if not self._started:
            part = part.lstrip()
            self._started = bool(part)
        text = self._held + part
        body = text.rstrip(_WHITESPACE + "`" if self.typed else _WHITESPACE)
        self._send_arguments(body)
        self._held = text[len(body) :]
        if at < 0:
            return False
        self._buffer = self._buffer[len(CALL_END) :]
        self._close_call(CALL_END)
        self._section_calls += 1
        self._where = _LIST
        return True

    def _not_a_call(self) -> None:
        """The markup read is given back as content; what follows is read afresh."""
        self._close_call()
        self._where = _TEXT

    def _arguments_end(self, truncated: bool) -> str:
        if truncated:
            return ""
        tail = self._held.rstrip()
        if self.typed and tail.endswith(FENCE):
            tail = tail[: -len(FENCE)].rstrip()
        return tail

    @classmethod
    def call_format(
        cls, tools: list[tuple[str, dict[str, Any]]], parallel: bool, literal: Literal
    ) -> dict[str, Any]:
        calls = one_of([cls._one_call(name, arguments, literal) for name, arguments in tools])
        if parallel:
            calls = sequence(calls, {"type": "star", "content": calls})
        return sequence(literal(CALLS_BEGIN), calls, literal(CALLS_END))

    @classmethod
    def _one_call(cls, name: str, arguments: dict[str, Any], literal: Literal) -> dict[str, Any]:
        return sequence(
            literal(CALL_BEGIN), const(name), literal(SEP), arguments, literal(CALL_END)
        )


class DeepSeekV3ToolParser(DeepSeekV31ToolParser):
    name = "deepseek_v3"
    typed = True

    @classmethod
    def _one_call(cls, name: str, arguments: dict[str, Any], literal: Literal) -> dict[str, Any]:
        return sequence(
            literal(CALL_BEGIN),
            const("function"),
            literal(SEP),
            const(f"{name}\n{FENCE}json\n"),
            arguments,
            const(f"\n{FENCE}"),
            literal(CALL_END),
        )
