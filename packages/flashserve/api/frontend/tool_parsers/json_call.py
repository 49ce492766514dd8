"""Reads one JSON call object, `{"name": ..., "arguments": {...}}`, as it streams in.

The scanner lexes the object's top level only (keys, and where each value starts and
ends); values are copied verbatim, so the arguments a client receives are exactly the
characters the model wrote, and they can be streamed as they arrive. It does not
validate the JSON inside values: constrained decoding guarantees that when it matters,
and a scanner that refused unusual-but-valid JSON would turn calls into content.
"""

from __future__ import annotations

import json

_WHITESPACE = " \t\r\n"

# Lexer states (top level of the call object).
_OPEN = 0  # before "{"
_KEY = 1  # expecting a key (or "}")
_IN_KEY = 2
_COLON = 3
_VALUE = 4  # expecting a value
_IN_VALUE = 5
_AFTER_VALUE = 6  # expecting "," or "}"
_DONE = 7
_FAILED = 8


class JsonCallScanner:
    """Incremental reader of one call object.

    `name` is set once the name key's string is complete; `arguments` grows with the raw
    text of the arguments value while it streams (an object or array value), or is set
    whole when it completes (a JSON string holding JSON, as some models write). `done`
    once the object's "}" is read; `failed` when the text is not a call object.
    """

    def __init__(
        self,
        name_keys: tuple[str, ...] = ("name",),
        argument_keys: tuple[str, ...] = ("arguments", "parameters"),
    ) -> None:
        self.name_keys = name_keys
        self.argument_keys = argument_keys
        self.name: str | None = None
        self.arguments = ""
        self.has_arguments = False
        self.keys: list[str] = []
        self._state = _OPEN
        self._key: list[str] = []
        self._value: list[str] = []
        self._kind = ""  # first character of the current value
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def failed(self) -> bool:
        return self._state == _FAILED

    @property
    def _current_key(self) -> str | None:
        return self.keys[-1] if self.keys else None

    def feed(self, text: str) -> int:
        """Consume characters until the object ends or fails; returns how many were used."""
        for used, char in enumerate(text):
            if self._state in (_DONE, _FAILED):
                return used
            self._step(char)
        return len(text)

    # -- the lexer ---------------------------------------------------------------

    def _step(self, char: str) -> None:
        state = self._state
        if state == _IN_VALUE:
            self._value_char(char)
        elif state == _IN_KEY:
            self._key_char(char)
        elif char in _WHITESPACE:
            return
        elif state == _OPEN:
            self._state = _KEY if char == "{" else _FAILED
        elif state == _KEY:
            if char == '"':
                self._key, self._state = [], _IN_KEY
            else:
                # "}" closes an empty object, or one with a trailing comma (lenient).
                self._state = _DONE if char == "}" else _FAILED
        elif state == _COLON:
            self._state = _VALUE if char == ":" else _FAILED
        elif state == _VALUE:
            self._start_value(char)
        elif state == _AFTER_VALUE:
            self._state = {",": _KEY, "}": _DONE}.get(char, _FAILED)

    def _key_char(self, char: str) -> None:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            try:
                self.keys.append(json.loads('"' + "".join(self._key) + '"'))
            except ValueError:
                self._state = _FAILED
                return
            self._state = _COLON
            return
        self._key.append(char)

    def _start_value(self, char: str) -> None:
        self._value, self._kind, self._state = [], char, _IN_VALUE
        self._depth, self._in_string, self._escaped = 0, False, False
        if self._current_key in self.argument_keys:
            self.has_arguments = True
        self._value_char(char)

    def _value_char(self, char: str) -> None:
        kind = self._kind
        if kind not in '{["':
            # A number, true, false or null: it ends at the first character not part of it.
            if char in _WHITESPACE or char in ",}":
                self._end_value()
                self._step(char)
            else:
                self._value.append(char)
            return
        self._value.append(char)
        if kind != '"' and self._current_key in self.argument_keys:
            self.arguments += char
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if kind == '"':
                    self._end_value()
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth == 0:
                self._end_value()

    def _end_value(self) -> None:
        key, raw = self._current_key, "".join(self._value)
        self._state = _AFTER_VALUE
        if key in self.name_keys:
            try:
                name = json.loads(raw)
            except ValueError:
                name = None
            if not isinstance(name, str) or not name:
                self._state = _FAILED
                return
            self.name = name
        elif key in self.argument_keys and self._kind not in "{[":
            self.arguments = _scalar_arguments(raw)


def _scalar_arguments(raw: str) -> str:
    """Arguments written as a JSON string of JSON ("{\\"a\\": 1}") are unwrapped; null
    means none. Anything else is passed on as written."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if value is None:
        return "{}"
    return value if isinstance(value, str) else raw
