"""GLM-4.5 / GLM-4.6 tool calls: a name, then key/value pairs in tags.

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

GLM's chat template writes a string value as it is and anything else as JSON
(`v | tojson if v is not string else v`), so the text of a value does not say its type;
the tool's schema does. A value is kept as text (a JSON string) unless the schema rules
strings out for that key, in which case it is read as JSON (and kept as text if it is
not JSON). The arguments stream as a JSON object built from the pairs: a key goes out
when its tag closes, a text value character by character, a JSON value when it closes.
Newlines between the tags are optional (GLM-4.7 writes none).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flashserve.api.frontend.output.markup import safe_prefix_len
from flashserve.api.frontend.tool_parsers.base import Literal, const, one_of, repeated, sequence
from flashserve.api.frontend.tool_parsers.tagged import MAX_NAME, TaggedCallParser, ahead, read_name

OPEN, CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"

# Where the reader is.
_TEXT = "text"
_NAME = "name"
_PAIRS = "pairs"  # expecting <arg_key> or </tool_call>
_KEY = "key"
_BEFORE_VALUE = "before_value"  # expecting <arg_value>
_VALUE = "value"


class Glm45ToolParser(TaggedCallParser):
    name = "glm45"
    start_markers = (OPEN,)
    markers = (OPEN, CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._where = _TEXT
        self._text = ""  # the name, key or JSON value read so far
        self._tool = ""
        self._as_text = True  # the current value is kept as text

    def _parse(self, final: bool) -> None:
        while self._buffer and not (self._stopped or self._skipping):
            where = self._where
            if where == _TEXT:
                if not self._content_until(OPEN, final):
                    return
                self._start_call(OPEN)
                self._where, self._text = _NAME, ""
            elif where == _NAME:
                if not self._read_name(final):
                    return
            elif where == _PAIRS:
                if not self._between(final, (KEY_OPEN, CLOSE)):
                    return
            elif where == _KEY:
                if not self._read_key(final):
                    return
            elif where == _BEFORE_VALUE:
                if not self._between(final, (VALUE_OPEN,)):
                    return
            elif not self._read_value(final):
                return

    def _read_name(self, final: bool) -> bool:
        buffer = self._buffer
        if not self._text:  # whitespace before the name
            stripped = buffer.lstrip()
            self._markup(buffer[: len(buffer) - len(stripped)])
            buffer = stripped
        size = read_name(buffer)
        self._text += buffer[:size]
        self._markup(buffer[:size])
        self._buffer = buffer[size:]
        if len(self._text) > MAX_NAME:
            self._not_a_call()
            return True
        if not self._buffer:
            return False  # the name may go on (cut short at the end: not read)
        if not self._text:
            self._not_a_call()
            return True
        self._tool = self._text
        self._send_name(self._text)
        self._where = _PAIRS
        return True

    def _not_a_call(self) -> None:
        """The markup read is given back as content; what follows is read afresh."""
        self._close_call()
        self._where = _TEXT

    def _between(self, final: bool, expected: tuple[str, ...]) -> bool:
        """Whitespace, then one of the `expected` tags."""
        buffer = self._buffer
        stripped = buffer.lstrip()
        self._markup(buffer[: len(buffer) - len(stripped)])
        self._buffer = stripped
        if not stripped:
            return False
        tag = ahead(stripped, expected, final)
        if tag == "":
            return False
        if tag is None:
            self._skip_rest()  # the name was sent: the call stands, the rest is dropped
            return False
        self._markup(tag)
        self._buffer = stripped[len(tag) :]
        if tag == CLOSE:
            self._close_call(CLOSE)
            self._where = _TEXT
        elif tag == KEY_OPEN:
            self._where, self._text = _KEY, ""
        else:
            self._start_value()
        return True

    def _read_key(self, final: bool) -> bool:
        buffer = self._buffer
        at = buffer.find(KEY_CLOSE)
        part = buffer[:at] if at >= 0 else buffer[: safe_prefix_len(buffer, (KEY_CLOSE,))]
        self._text += part
        self._markup(part)
        self._buffer = buffer[len(part) :]
        key = self._text.strip()
        if "<" in self._text or (at >= 0 and not key):
            self._skip_rest()
            return False
        if at < 0:
            return False
        self._buffer = self._buffer[len(KEY_CLOSE) :]
        self._markup(KEY_CLOSE)
        opener = "{" if self._call.sent_arguments == 0 else ", "
        self._send_arguments(f"{opener}{json.dumps(key, ensure_ascii=False)}: ")
        self._as_text = keeps_text(self.schemas.get(self._tool), key)
        self._where = _BEFORE_VALUE
        return True

    def _start_value(self) -> None:
        self._where, self._text = _VALUE, ""
        if self._as_text:
            self._send_arguments('"')

    def _read_value(self, final: bool) -> bool:
        buffer = self._buffer
        at = buffer.find(VALUE_CLOSE)
        part = buffer[:at] if at >= 0 else buffer[: safe_prefix_len(buffer, (VALUE_CLOSE,))]
        self._markup(part)
        self._buffer = buffer[len(part) :]
        if self._as_text:
            self._send_arguments(json.dumps(part, ensure_ascii=False)[1:-1])
        else:
            self._text += part
        if at < 0:
            return False
        self._buffer = self._buffer[len(VALUE_CLOSE) :]
        self._markup(VALUE_CLOSE)
        if self._as_text:
            self._send_arguments('"')
        else:
            self._send_arguments(json_value_text(self._text))
        self._where = _PAIRS
        return True

    def _arguments_end(self, truncated: bool) -> str:
        # Complete pairs make a complete object, closed even if </tool_call> never came
        # (a key is sent only once complete); a value cut short is left as it was sent,
        # as other formats leave their JSON.
        if self._call.sent_arguments and (not truncated or self._where in (_PAIRS, _KEY)):
            return "}"
        return ""

    def _close_call(self, closer: str = "", truncated: bool = False) -> bool:
        called = super()._close_call(closer, truncated)
        self._where = _TEXT
        return called

    @classmethod
    def arguments_format(
        cls, parameters: dict[str, Any], json_format: Callable[..., dict[str, Any]]
    ) -> dict[str, Any]:
        """Pairs for the schema's properties, in their declared order (required ones
        always, others optionally), each value as GLM writes it: text for keys that
        take text, else JSON of the property's schema. No other keys."""
        from flashserve.api.frontend.tool_parsers.glm_grammar import pairs_format

        return pairs_format(parameters, json_format)

    @classmethod
    def call_format(
        cls, tools: list[tuple[str, dict[str, Any]]], parallel: bool, literal: Literal
    ) -> dict[str, Any]:
        calls = [
            sequence(literal(OPEN), const(f"{name}\n"), pairs, literal(CLOSE))
            for name, pairs in tools
        ]
        return repeated(one_of(calls), "\n", parallel)


def json_value_text(text: str) -> str:
    """A value for a key that does not take text: its JSON if it is JSON, else the text
    as a JSON string."""
    stripped = text.strip()
    try:
        json.loads(stripped, parse_constant=_refuse)
    except ValueError:
        return json.dumps(text, ensure_ascii=False)
    return stripped


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def property_schema(parameters: dict[str, Any] | None, key: str) -> Any:
    """The schema of `key` in a tool's parameters (None: anything goes)."""
    if not isinstance(parameters, dict):
        return None
    properties = parameters.get("properties")
    if isinstance(properties, dict) and key in properties:
        return resolve(properties[key], parameters)
    extra = parameters.get("additionalProperties")
    return resolve(extra, parameters) if isinstance(extra, dict) else None


def resolve(schema: Any, root: dict[str, Any]) -> Any:
    """Follows a local "$ref" ("#/$defs/x", "#/definitions/x"), once."""
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        parts = schema["$ref"].removeprefix("#/").split("/")
        target: Any = root
        for part in parts:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            return target
    return schema


def keeps_text(parameters: dict[str, Any] | None, key: str) -> bool:
    """Whether the value of `key` is kept as the text written."""
    return takes_text(property_schema(parameters, key), parameters or {})


def takes_text(schema: Any, root: dict[str, Any]) -> bool:
    """Whether a string can satisfy `schema` (then a value is kept as text)."""
    schema = resolve(schema, root)
    if not isinstance(schema, dict):
        return True
    kind = schema.get("type")
    if kind is not None:
        return "string" in (kind if isinstance(kind, list) else [kind])
    if "const" in schema:
        return isinstance(schema["const"], str)
    if isinstance(schema.get("enum"), list):
        return any(isinstance(v, str) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return any(takes_text(option, root) for option in schema[key])
    # Keywords that only objects or arrays have imply the type.
    return not any(k in schema for k in ("properties", "items", "required", "prefixItems"))
