"""Helpers for finding markup (tool-call and thinking tags) in text that arrives in pieces.

A streamed response must never show a tag as content, yet a tag can be split anywhere
between two chunks ("<tool_" + "call>"). Parsers therefore emit text only up to the first
point where the rest could still grow into a tag, and hold that tail back.
"""

from __future__ import annotations

from collections.abc import Iterable


def find_marker(text: str, markers: Iterable[str]) -> tuple[int, str]:
    """(index, marker) of the earliest marker in `text`, or (-1, "")."""
    best, found = -1, ""
    for marker in markers:
        at = text.find(marker)
        if at >= 0 and (best < 0 or at < best):
            best, found = at, marker
    return best, found


def safe_prefix_len(text: str, markers: Iterable[str]) -> int:
    """How much of `text` can be released: all of it, except a tail that is a proper
    prefix of some marker (and might complete into it with the next chunk)."""
    cut = len(text)
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                cut = min(cut, len(text) - size)
                break
    return cut


class WhitespaceGate:
    """Passes content through, holding trailing whitespace until it is known to be interior.

    Whitespace that only separates content from markup is layout, not content: the
    whitespace before markup that opens the response ("\n<tool_call>..."), after markup
    that ends it ("...</tool_call>\n"), and at the start of content that follows markup.
    Whitespace between two pieces of content is kept once (the markup between them just
    disappears), and a response without markup passes unchanged.
    """

    def __init__(self) -> None:
        self._held = ""
        self._started = False  # some content went out
        self._after_markup = False  # markup came after the last content
        # Whitespace right after markup is dropped when whitespace before it is kept
        # (or nothing came before): decided at the markup, so any split reads the same.
        self._strip_leading = False

    def push(self, text: str) -> str:
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        if body:
            self._started, self._after_markup = True, False
        return body

    def markup(self) -> None:
        """Markup starts here."""
        if not self._started:
            self._held = ""
        self._after_markup = True
        self._strip_leading = bool(self._held) or not self._started

    def release(self) -> str:
        """The response ended: held whitespace is content unless markup came after it."""
        held, self._held = self._held, ""
        return "" if self._after_markup else held
