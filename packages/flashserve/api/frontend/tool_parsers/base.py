"""What every tool-call parser shares: the output it produces and the life of one call.

A parser is fed the response text as it is generated (any split, down to single
characters) and answers each piece with the content it can release and the tool-call
deltas it has read. Feeding the whole text at once, or byte by byte, gives the same
content and the same calls once the deltas are joined; that is what makes a streamed
response equal the non-streamed one.

The rules, the same for every format:
* a call's first delta (index, id, type, name) goes out once its name is read; its
  arguments then stream as the model writes them (verbatim JSON text);
* markup that turns out not to be a call (no name could be read) is given back as
  content, unchanged, except a marked call cut off before its name (max_tokens), which
  is dropped; markup after a call whose name was already sent is dropped;
* whitespace that only separates content from markup is dropped (markup.WhitespaceGate);
* with `max_calls`, calls beyond it are never read, and `exhausted` tells the caller
  that generation can stop.
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flashserve.api.frontend.output.markup import WhitespaceGate, safe_prefix_len
from flashserve.api.frontend.tool_parsers.json_call import JsonCallScanner

_ID_ALPHABET = string.ascii_letters + string.digits

# A structural-tag format for a piece of fixed markup: a special token where the
# tokenizer has one for it, else the text (see api/tool_grammar.py).
Literal = Callable[[str], dict[str, Any]]


def new_call_id() -> str:
    """OpenAI-style tool call id: "call_" and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCallDelta:
    """A piece of one tool call: the first carries id and name, later ones arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {}
        if self.name is not None:
            function["name"] = self.name
        if self.arguments or self.name is not None:
            function["arguments"] = self.arguments
        body: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            body.update(id=self.id, type="function")
        body["function"] = function
        return body


@dataclass
class ParsedText:
    """What one piece of response text turned into."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedText) -> None:
        self.content += other.content
        for delta in other.calls:
            self.add_call(delta)

    def add_call(self, delta: ToolCallDelta) -> None:
        """Append, merging with the previous delta of the same call (one per chunk)."""
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments
        elif delta.id is not None or delta.arguments:
            self.calls.append(delta)


class _Call:
    """The call being read: its scanner, the raw markup so far, and what was sent."""

    def __init__(self, index: int, opener: str, scanner: JsonCallScanner) -> None:
        self.index = index
        self.raw = opener  # everything consumed for this call, for giving it back
        self.marked = bool(opener)  # opened by markup, not just by a "{"
        self.scanner = scanner
        self.id: str | None = None  # set once the first delta has gone out
        self.sent_arguments = 0


# Outcomes of ToolParser._scan_open_call.
CALL_DONE = "done"
NOT_A_CALL = "not_a_call"
CALL_BROKEN = "broken"  # the parser now skips the rest of the response (_skip_rest)


class ToolParser(ABC):
    """Base of the per-format parsers; one instance per response."""

    name: ClassVar[str]
    # Strings that open tool-call markup; special tokens among them are kept by the
    # detokenizer while this parser runs, and banned when tool_choice is "none".
    start_markers: ClassVar[tuple[str, ...]] = ()
    # Every markup string of the format (start markers included).
    markers: ClassVar[tuple[str, ...]] = ()
    # Keys under which the format writes the arguments.
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(
        self,
        tool_names: Collection[str] = (),
        max_calls: int | None = None,
        schemas: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        self.tool_names = frozenset(tool_names)
        self.max_calls = max_calls
        # Each tool's `parameters` schema, for formats whose arguments are not JSON text
        # (GLM's are typed by the schema).
        self.schemas = dict(schemas or {})
        self.num_calls = 0  # calls whose first delta was sent
        self._buffer = ""
        self._gate = WhitespaceGate()
        self._call: _Call | None = None
        self._out = ParsedText()
        self._stopped = False
        self._skipping = False  # a sent call broke off: the rest of the text is dropped

    @property
    def exhausted(self) -> bool:
        """True once `max_calls` calls are complete: nothing more will be read."""
        return self._stopped

    # -- the public interface -------------------------------------------------------

    def feed(self, text: str) -> ParsedText:
        if not (self._stopped or self._skipping):
            self._buffer += text
            self._parse(final=False)
        return self._take()

    def finish(self) -> ParsedText:
        """The response ended: release everything held back (but what is skipped)."""
        if not self._stopped:
            if not self._skipping:  # else the buffer is empty: _skip_rest cleared it
                self._parse(final=True)
            if self._call is not None:
                self._close_call(truncated=True)
            self._out.content += self._gate.release()
            self._buffer = ""
        return self._take()

    @classmethod
    def arguments_format(
        cls, parameters: dict[str, Any], json_format: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        """The structural-tag format of a call's arguments for a tool's `parameters`
        schema; `json_format` makes the one of JSON arguments, which most formats write."""
        return json_format(parameters)

    @classmethod
    @abstractmethod
    def call_format(
        cls, tools: list[tuple[str, dict[str, Any]]], parallel: bool, literal: Literal
    ) -> dict[str, Any]:
        """The xgrammar structural-tag format of one call (or, if `parallel`, one or
        more) of the given tools, as (name, arguments format) pairs, written the way
        this format writes calls."""

    # -- for subclasses ----------------------------------------------------------------

    @abstractmethod
    def _parse(self, final: bool) -> None:
        """Consume `self._buffer` as far as it can be read (all of it when `final`)."""

    def _content(self, text: str) -> None:
        if text:
            self._out.content += self._gate.push(text)

    def _open_call(self, opener: str) -> None:
        self._gate.markup()
        scanner = JsonCallScanner(argument_keys=self.argument_keys)
        self._call = _Call(self.num_calls, opener, scanner)

    def _feed_call(self, text: str) -> int:
        """Give call text to the open call's scanner; returns how much it consumed."""
        call = self._call
        assert call is not None
        used = call.scanner.feed(text)
        call.raw += text[:used]
        self._send(call)
        return used

    def _content_until(self, marker: str, final: bool) -> bool:
        """Pass text before `marker` on as content, holding back a tail that may be the
        start of a split marker; True once the marker is found and consumed."""
        buffer = self._buffer
        at = buffer.find(marker)
        if at < 0:
            keep = len(buffer) if final else safe_prefix_len(buffer, (marker,))
            self._content(buffer[:keep])
            self._buffer = buffer[keep:]
            return False
        self._content(buffer[:at])
        self._buffer = buffer[at + len(marker) :]
        return True

    def _scan_open_call(self) -> str | None:
        """Feed the buffer to the open call. Returns CALL_DONE (a call ended), NOT_A_CALL
        (its text went back to content), CALL_BROKEN (a call already sent broke off: the
        rest of the response is skipped) or None (more text needed)."""
        call = self._call
        assert call is not None
        used = self._feed_call(self._buffer)
        self._buffer = self._buffer[used:]
        if call.scanner.done:
            return CALL_DONE if self._close_call() else NOT_A_CALL
        if call.scanner.failed:
            if call.id is None:
                # Not a call: what was read goes back as content, and what follows is
                # read afresh (as it would be had it arrived in a later chunk).
                self._close_call()
                return NOT_A_CALL
            self._skip_rest()
            return CALL_BROKEN
        return None

    def _skip_rest(self) -> None:
        """A call already sent broke off: drop the rest of its markup, and everything
        after it, up to the end of the response (the open call stays open, and
        `finish` closes it as cut off)."""
        self._skipping = True
        self._buffer = ""

    def _absorb(self, text: str) -> None:
        """Markup of the open call that the scanner did not read (after its object ended
        or failed): kept only for giving an unreadable call back as content."""
        assert self._call is not None
        self._call.raw += text

    def _accepts(self, name: str) -> bool:
        """Whether a call to `name` is taken as a call (formats without a start marker
        accept declared tools only, so that JSON content is not mistaken for a call)."""
        return True

    def _send(self, call: _Call) -> None:
        scanner = call.scanner
        if call.id is None:
            if scanner.name is None or not self._accepts(scanner.name):
                return
            call.id = new_call_id()
            self.num_calls += 1
            self._out.add_call(ToolCallDelta(call.index, call.id, scanner.name))
        if len(scanner.arguments) > call.sent_arguments:
            self._out.add_call(
                ToolCallDelta(call.index, arguments=scanner.arguments[call.sent_arguments :])
            )
            call.sent_arguments = len(scanner.arguments)

    def _close_call(self, closer: str = "", truncated: bool = False) -> bool:
        """End the open call; True if it was a call. If no name was ever read, its markup
        goes back to content as written (unless the response ended inside it)."""
        call, self._call = self._call, None
        assert call is not None
        if call.id is None:
            if not (truncated and call.marked):
                self._content(call.raw + closer)
            return False
        if not call.scanner.has_arguments and call.sent_arguments == 0:
            self._out.add_call(ToolCallDelta(call.index, arguments="{}"))
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            self._stopped = True
            self._buffer = ""
        return True

    def _take(self) -> ParsedText:
        out, self._out = self._out, ParsedText()
        return out


def const(text: str) -> dict[str, Any]:
    return {"type": "const_string", "value": text}


def sequence(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}


def json_call_options(
    tools: list[tuple[str, dict[str, Any]]], arguments_key: str
) -> dict[str, Any]:
    """Any one of the tools, written as `{"name": <name>, "<arguments_key>": <arguments>}`."""
    return one_of(
        [
            sequence(
                const(f'{{"name": {json.dumps(name)}, "{arguments_key}": '), arguments, const("}")
            )
            for name, arguments in tools
        ]
    )


def one_of(options: list[dict[str, Any]]) -> dict[str, Any]:
    return options[0] if len(options) == 1 else {"type": "or", "elements": options}


def repeated(item: dict[str, Any], separator: str, parallel: bool) -> dict[str, Any]:
    """`item`, or with `parallel` one or more of them joined by `separator`."""
    if not parallel:
        return item
    return sequence(item, {"type": "star", "content": sequence(const(separator), item)})
