"""What parsers share whose formats write the name in markup and arguments not as one
JSON call object (GLM-4.5, DeepSeek-V3.1): the parser itself decides where the name ends
and produces the arguments text, instead of a JsonCallScanner.

The rules of base.py hold: the first delta goes out once the name is read, arguments
stream after it, markup with no readable name goes back to content (dropped if the
response ended inside it), and a call whose name was sent stands however its markup ends.
"""

from __future__ import annotations

import re
from typing import Any

from flashserve.api.frontend.tool_parsers.base import ToolCallDelta, ToolParser, new_call_id

# A name the markup can carry: no whitespace, tag or JSON punctuation (what follows a name
# is one of those); a longer "name" is not one.
MAX_NAME = 256
_NAME_STOP = re.compile(r"[\s<>{}\[\]\"'\\,`]")


class TaggedCall:
    """The call being read: its raw markup (for giving it back) and what was sent."""

    def __init__(self, index: int, opener: str) -> None:
        self.index = index
        self.raw = opener
        self.id: str | None = None
        self.sent_arguments = 0


class TaggedCallParser(ToolParser):
    """Base of the parsers that emit a call's name and arguments themselves."""

    # self._call holds a TaggedCall here (base.finish() closes it if cut short).
    _call: Any

    def _start_call(self, opener: str) -> None:
        self._gate.markup()
        self._call = TaggedCall(self.num_calls, opener)

    def _markup(self, text: str) -> None:
        """Markup of the open call, kept for giving an unreadable call back."""
        assert self._call is not None
        self._call.raw += text

    def _send_name(self, name: str) -> None:
        call = self._call
        assert call is not None and call.id is None
        call.id = new_call_id()
        self.num_calls += 1
        self._out.add_call(ToolCallDelta(call.index, call.id, name))

    def _send_arguments(self, text: str) -> None:
        call = self._call
        assert call is not None and call.id is not None
        if text:
            self._out.add_call(ToolCallDelta(call.index, arguments=text))
            call.sent_arguments += len(text)

    def _arguments_end(self, truncated: bool) -> str:
        """Text that completes the arguments when the call closes (subclasses)."""
        return ""

    def _close_call(self, closer: str = "", truncated: bool = False) -> bool:
        call = self._call
        assert call is not None
        if call.id is None:
            self._call = None
            if not truncated:
                self._content(call.raw + closer)
            return False
        self._send_arguments(self._arguments_end(truncated))
        if call.sent_arguments == 0:
            self._send_arguments("{}")
        self._call = None
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            self._stopped = True
            self._buffer = ""
        return True


def read_name(text: str) -> int:
    """How many leading characters of `text` can belong to a name."""
    stop = _NAME_STOP.search(text)
    return len(text) if stop is None else stop.start()


def name_breaks_at(head: str, more: str) -> int | None:
    """Index of the character of `more` at which `head + more`, stripped, stops being a
    possible name (a stop character, a second word, too long); None if it never does.
    Reading stops there, so the same text gives the same result however it is split."""
    core = head.lstrip()
    trailing_space = core != core.rstrip()
    size = len(core.rstrip())
    for i, char in enumerate(more):
        if char.isspace():
            trailing_space = trailing_space or size > 0
            continue
        size += 1
        if trailing_space or _NAME_STOP.match(char) or size > MAX_NAME:
            return i
    return None


def ahead(buffer: str, options: tuple[str, ...], final: bool) -> str | None:
    """Which of `options` `buffer` starts with (the longest); "" if it could still grow
    into one (more text needed); None if it is none of them."""
    if not final and any(len(o) > len(buffer) and o.startswith(buffer) for o in options):
        return ""
    found = [option for option in options if buffer.startswith(option)]
    return max(found, key=len) if found else None
