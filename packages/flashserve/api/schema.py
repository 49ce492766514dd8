"""Validate chat completion request bodies against the shipped JSON Schema.

Order of checks, cheapest and most hostile-proof first:
1. the body is a JSON object;
2. `check_depth`: nesting depth, approximate size and non-finite numbers, before
   jsonschema recurses into anything;
3. the Draft 2020-12 schema in data/ChatCompletionRequest.schema.json;
4. `check_semantics`: rules the schema cannot express (cross-field and per-model).

Every failure is a `RequestError` (HTTP 400, code "invalid_request") whose `param`
is the path of the offending field, such as `messages[0].role`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from flashserve.api.errors import RequestError
from flashserve.api.tools import check_tools

SCHEMA_FILENAME = "ChatCompletionRequest.schema.json"
SCHEMA_PATH_ENV = "FLASHSERVE_SCHEMA_PATH"
MAX_BYTES_ENV = "FLASHSERVE_MAX_REQUEST_BYTES"
# packages/flashserve/api/schema.py -> the repository root holds data/.
REPO_SCHEMA_PATH = Path(__file__).resolve().parents[3] / "data" / SCHEMA_FILENAME
# In the Truss serving image data/ is copied to /app/data while the package lives
# under /packages, so the repo-relative path does not exist there.
TRUSS_SCHEMA_PATH = Path("/app/data") / SCHEMA_FILENAME

INVALID_REQUEST = "invalid_request"
DEFAULT_MAX_DEPTH = 64
# Generous because multimodal requests carry base64 images and audio inline.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# Far above real requests (long chats, big tool schemas) yet keeps jsonschema well under 1 s.
DEFAULT_MAX_VALUES = 100_000
MAX_KEY_IN_PATH = 64


# --------------------------------------------------------------------------- loading


def find_schema_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the schema is: `path`, else $FLASHSERVE_SCHEMA_PATH, else the repo or Truss copy."""
    if path is not None:
        return Path(path)
    from_env = os.environ.get(SCHEMA_PATH_ENV)
    if from_env:
        return Path(from_env)
    for candidate in (REPO_SCHEMA_PATH, TRUSS_SCHEMA_PATH):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SCHEMA_FILENAME} not found at {REPO_SCHEMA_PATH} or {TRUSS_SCHEMA_PATH}; "
        f"set {SCHEMA_PATH_ENV}"
    )


@functools.lru_cache(maxsize=4)
def _read_schema(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_schema(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The request schema, read once per file. Shared between callers: do not mutate it."""
    return _read_schema(find_schema_path(path).resolve())


def default_max_bytes() -> int:
    """The request size limit: $FLASHSERVE_MAX_REQUEST_BYTES or DEFAULT_MAX_BYTES."""
    return int(os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)


# --------------------------------------------------------------------------- helpers


def _invalid(message: str, param: str | None) -> RequestError:
    return RequestError(message, param=param, code=INVALID_REQUEST)


def format_path(parts: Iterable[str | int]) -> str | None:
    """`("messages", 0, "role")` -> `"messages[0].role"`; None for the body itself."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # Keys are client-chosen: clip them so an error cannot echo megabytes back.
            key = part if len(part) <= MAX_KEY_IN_PATH else part[: MAX_KEY_IN_PATH - 3] + "..."
            out += f".{key}" if out else key
    return out or None


def _short(value: Any, limit: int = 60) -> str:
    """A JSON rendering of `value` fit for a message; hostile bodies carry huge values."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_JSON_TYPE = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}
_WITH_ARTICLE = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "boolean": "a boolean",
    "integer": "an integer",
    "number": "a number",
    "null": "null",
}
_PLURAL = {
    "object": "objects",
    "array": "arrays",
    "string": "strings",
    "boolean": "booleans",
    "integer": "integers",
    "number": "numbers",
}
_PLACEHOLDER = {"object": "{...}", "array": "[...]", "string": '"..."'}


def _json_type(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _join_or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# --------------------------------------------------------------------------- hostile input


def check_depth(
    body: object,
    max_depth: int = DEFAULT_MAX_DEPTH,
    *,
    max_bytes: int | None = None,
    max_values: int | None = None,
) -> None:
    """Reject bodies nested deeper than `max_depth`, larger than `max_bytes`, holding more
    than `max_values` JSON values, or holding NaN/Infinity.

    Iterative, so hostile nesting cannot exhaust the Python stack, and it stops at the
    first violation. The size is the approximate serialized JSON length (characters,
    not UTF-8 bytes): a cheap guard for callers that only see the parsed body. The
    value count bounds jsonschema's work, which costs microseconds per value (a
    million-item `bad_token_ids` takes seconds). Non-finite numbers are caught here
    because bounds like `0 <= temperature <= 4` are silently true for NaN in jsonschema.
    """
    if not isinstance(body, (dict, list)):
        return
    size = values = 0
    # (container, its depth, the top-level field it sits under, for `param`)
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        node, depth, field = stack.pop()
        if depth > max_depth:
            where = f"'{field}'" if field else "The request body"
            raise _invalid(f"{where} is nested more than {max_depth} levels deep", field)
        values += len(node)
        if max_values is not None and values > max_values:
            where = f" (limit reached in '{field}')" if field else ""
            raise _invalid(
                f"The request body holds more than {max_values} JSON values{where}", field
            )
        entries = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in entries:
            owner = field if field is not None else format_path([key])
            size += len(key) + 4 if isinstance(key, str) else 1
            if isinstance(value, (dict, list)):
                size += 2
                stack.append((value, depth + 1, owner))
            elif isinstance(value, str):
                size += len(value) + 2
            else:
                size += 8
                if isinstance(value, float) and not math.isfinite(value):
                    raise _invalid(f"'{owner}' contains a non-finite number ({value})", owner)
        if max_bytes is not None and size > max_bytes:
            raise _invalid(f"The request body is larger than the {max_bytes}-byte limit", None)


def parse_json_body(raw: bytes | str, *, max_bytes: int | None = None) -> object:
    """Parse a raw request body, refusing oversize or malformed JSON with a 400."""
    limit = default_max_bytes() if max_bytes is None else max_bytes
    if len(raw) > limit:
        raise _invalid(f"The request body is larger than the {limit}-byte limit", None)
    try:
        return json.loads(raw)
    except RecursionError:
        raise _invalid("The request body is nested too deeply", None) from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _invalid(f"The request body is not valid JSON: {exc}", None) from None


# --------------------------------------------------------------------------- schema errors

_UNIONS = ("anyOf", "oneOf")

# Plain-word reasons for single-keyword failures; {where} is the field in quotes.
_REASONS = {
    "minimum": "{where} must be at least {limit}, got {value}",
    "maximum": "{where} must be at most {limit}, got {value}",
    "exclusiveMinimum": "{where} must be greater than {limit}, got {value}",
    "exclusiveMaximum": "{where} must be less than {limit}, got {value}",
    "minLength": "{where} must be at least {limit} character(s) long, got {size}",
    "maxLength": "{where} must be at most {limit} characters long, got {size}",
    "minItems": "{where} must have at least {limit} item(s), got {size}",
    "maxItems": "{where} must have at most {limit} items, got {size}",
    "minProperties": "{where} must have at least {limit} key(s), got {size}",
    "maxProperties": "{where} must have at most {limit} keys, got {size}",
    "enum": "{where} must be one of {choices}, got {value}",
    "const": "{where} must be {choices}, got {value}",
}


def _reason(error: ValidationError) -> tuple[str | None, str]:
    """(param, message) for a failure of one keyword (not a union)."""
    path = list(error.absolute_path)
    param = format_path(path)
    where = f"'{param}'" if param else "the request body"
    instance = error.instance

    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {})
        unknown = next((key for key in instance if key not in known), None)
        if unknown is not None:
            field = format_path([*path, unknown])
            owner = f"'{param}'" if param else "the request"
            return field, f"Unknown field '{field}': {owner} does not accept it"
    if error.validator == "required" and isinstance(instance, dict):
        missing = next((key for key in error.validator_value if key not in instance), None)
        if missing is not None:
            field = format_path([*path, missing])
            return field, f"Missing required field '{field}'"
    if error.validator == "type":
        wanted = error.validator_value
        names = [wanted] if isinstance(wanted, str) else list(wanted)
        expected = _join_or([_WITH_ARTICLE.get(name, name) for name in names])
        got = _WITH_ARTICLE.get(_json_type(instance), _json_type(instance))
        return param, f"Invalid type for {where}: expected {expected}, got {got}"
    template = _REASONS.get(str(error.validator))
    if template is not None:
        choices = error.validator_value
        if error.validator == "const":
            choices = [choices]
        message = template.format(
            where=where,
            limit=error.validator_value,
            value=_short(instance),
            size=len(instance) if hasattr(instance, "__len__") else "?",
            choices=_join_or([_short(c) for c in choices]) if isinstance(choices, list) else "",
        )
        return param, message
    return param, f"Invalid value for {where}: {_short(error.message, 200)}"


def _deref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow local `#/$defs/...` refs (the only kind the shipped schema has)."""
    while isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/$defs/"):
        schema = root["$defs"][schema["$ref"].removeprefix("#/$defs/")]
    return schema


def _tag(schema: Mapping[str, Any]) -> Any:
    """The `type` constant of a tagged object schema (`{"type": "text", ...}`), else None."""
    return schema.get("properties", {}).get("type", {}).get("const")


def _shapes(schema: Mapping[str, Any], root: Mapping[str, Any]) -> list[str]:
    """Short, human descriptions of what one union branch accepts (an enum gives several)."""
    schema = _deref(schema, root)
    if "const" in schema:
        return [_short(schema["const"])]
    if "enum" in schema:
        return [_short(choice) for choice in schema["enum"]]
    kind = schema.get("type")
    properties = schema.get("properties", {})
    if kind == "object" and _tag(schema) is not None:
        fields = [f'"type": {_short(_tag(schema))}']
        for name in schema.get("required", []):
            if name != "type":
                value = _deref(properties.get(name, {}), root).get("type")
                fields.append(f'"{name}": {_PLACEHOLDER.get(value, "...")}')
        return ["{" + ", ".join(fields) + "}"]
    if kind == "array":
        items = _deref(schema.get("items", {}), root)
        tags = [_tag(_deref(branch, root)) for branch in items.get("anyOf", ())]
        if tags and None not in tags:
            noun = "/".join(map(str, tags)) + " parts"
        else:
            noun = _PLURAL.get(items.get("type"), "items")
        limit = f" (at most {schema['maxItems']})" if "maxItems" in schema else ""
        return [f"an array of {noun}{limit}"]
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        return [
            f"a string of {low} to {high} characters"
            if high
            else f"a string of at least {low} characters"
        ]
    return [_WITH_ARTICLE.get(kind, "a value") if isinstance(kind, str) else "a value"]


def _is_shape_mismatch(error: ValidationError) -> bool:
    """Whether a union branch failed because the value is plainly another kind of thing."""
    where = tuple(error.relative_path)
    return (error.validator == "type" and where == ()) or (
        error.validator in ("const", "enum") and where == ("type",)
    )


def _intended_branch(union: ValidationError) -> list[ValidationError] | None:
    """The errors of the one branch the client evidently meant, if exactly one fits.

    A branch is "meant" when the value has its JSON type and, for tagged objects, its
    `type` tag: `{"type": "json_schema"}` means ResponseFormatJson even though it
    fails there (missing `json_schema`).
    """
    by_branch: dict[Any, list[ValidationError]] = {}
    for error in union.context or ():
        by_branch.setdefault(error.relative_schema_path[0], []).append(error)
    fitting = [errs for errs in by_branch.values() if not any(map(_is_shape_mismatch, errs))]
    return fitting[0] if len(fitting) == 1 else None


def _nearest_union(error: ValidationError) -> ValidationError | None:
    node: ValidationError | None = error
    while node is not None and node.validator not in _UNIONS:
        node = node.parent
    return node


def explain(error: ValidationError, root: Mapping[str, Any]) -> RequestError:
    """Turn a jsonschema error into a RequestError that names the field and the reason."""
    union = _nearest_union(error)
    if union is None:
        param, message = _reason(error)
        return _invalid(message, param)

    where = format_path(union.absolute_path)
    shapes = _join_or([text for branch in union.validator_value for text in _shapes(branch, root)])
    detail: ValidationError | None = error
    if error is union:
        branch = _intended_branch(union)
        detail = best_match(branch) if branch else None
        if detail is not None and detail.validator in _UNIONS:
            return explain(detail, root)  # e.g. one bad part inside `content`
    if detail is None:
        return _invalid(f"Invalid value for '{where}': expected {shapes}", where)
    param, message = _reason(detail)
    return _invalid(f"{message}. '{where}' accepts {shapes}", param)


# --------------------------------------------------------------------------- semantics


@dataclass(frozen=True)
class Bound:
    """A numeric range a field must lie in when present (None = unbounded)."""

    field: str
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    why: str = ""

    def violation(self, value: float) -> str | None:
        too_low = self.low is not None and (
            value <= self.low if self.low_exclusive else value < self.low
        )
        too_high = self.high is not None and value > self.high
        if not (too_low or too_high):
            return None
        if self.low == self.high:
            rule = f"must be {self.low}"
        elif self.low is not None and self.high is not None:
            rule = f"must be between {self.low} and {self.high}"
        elif self.low is not None:
            rule = f"must be {'greater than' if self.low_exclusive else 'at least'} {self.low}"
        else:
            rule = f"must be at most {self.high}"
        why = f" ({self.why})" if self.why else ""
        return f"'{self.field}' {rule}, got {_short(value)}{why}"


BOUNDS = (
    Bound("n", 1, 1, why="only one completion per request is supported"),
    Bound("best_of", 1, 1, why="only best_of=1 is supported"),
    Bound("top_logprobs", 0, 20),
    Bound("min_tokens", 0),
    Bound("top_k", -1, why="-1 or 0 disables top-k sampling"),
    Bound("min_p", 0, 1),
    Bound("top_p_min", 0, 1),
    Bound("repetition_penalty", 0, low_exclusive=True),
    Bound("frequency_penalty", -2, 2),
    Bound("presence_penalty", -2, 2),
    # The engine seeds a torch.Generator, which takes 64 bits (signed or not).
    Bound("seed", -(2**63), 2**64 - 1, why="a 64-bit integer"),
)

TOKEN_ID_LISTS = ("bad_token_ids", "stop_token_ids")
MEDIA_PART_TYPES = ("image_url", "input_audio")
LOGIT_BIAS_LIMIT = 100
_TOKEN_ID_KEY = re.compile(r"[0-9]+")


def _check_top_logprobs(body: dict[str, Any]) -> None:
    top = body.get("top_logprobs")
    if _is_number(top) and top > 0 and body.get("logprobs") is not True:
        raise _invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs")


def _check_min_tokens(body: dict[str, Any]) -> None:
    low, high = body.get("min_tokens"), body.get("max_tokens")
    if _is_number(low) and _is_number(high) and low > high:
        raise _invalid(
            f"'min_tokens' ({low}) must not be greater than 'max_tokens' ({high})", "min_tokens"
        )


def _check_top_p_min(body: dict[str, Any]) -> None:
    floor, top_p = body.get("top_p_min"), body.get("top_p", 1)
    if _is_number(floor) and _is_number(top_p) and floor > top_p:
        raise _invalid(
            f"'top_p_min' ({floor}) must not be greater than 'top_p' ({top_p})", "top_p_min"
        )


def _check_stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")


def _check_logit_bias(body: dict[str, Any]) -> None:
    bias = body.get("logit_bias")
    if not isinstance(bias, dict):
        return
    for key, value in bias.items():
        param = format_path(["logit_bias", key])
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise _invalid(
                f"Invalid key in '{param}': logit_bias keys must be token IDs "
                "(non-negative integers written as strings)",
                param,
            )
        if _is_number(value) and not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise _invalid(
                f"'{param}' must be between -{LOGIT_BIAS_LIMIT} and {LOGIT_BIAS_LIMIT}, "
                f"got {_short(value)}",
                param,
            )


def _check_token_ids(body: dict[str, Any]) -> None:
    # Only the sign here: the vocabulary size is known to the engine, which checks it.
    for name in TOKEN_ID_LISTS:
        ids = body.get(name)
        for index, token in enumerate(ids if isinstance(ids, list) else ()):
            if _is_number(token) and token < 0:
                raise _invalid(
                    f"'{name}[{index}]' must be a token ID (>= 0), got {token}",
                    f"{name}[{index}]",
                )


CROSS_FIELD_CHECKS: tuple[Callable[[dict[str, Any]], None], ...] = (
    _check_top_logprobs,
    _check_min_tokens,
    _check_top_p_min,
    _check_stream_options,
    _check_logit_bias,
    _check_token_ids,
)


def _check_messages(messages: Any, multimodal: bool) -> None:
    if not isinstance(messages, list):
        return
    if not messages:
        raise _invalid("'messages' must contain at least one message", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id"), str):
            param = f"messages[{i}].tool_call_id"
            raise _invalid(
                f"Missing required field '{param}': a tool message must name the tool call "
                "it answers",
                param,
            )
        parts = message.get("content")
        for j, part in enumerate(parts if isinstance(parts, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PART_TYPES and not multimodal:
                param = f"messages[{i}].content[{j}]"
                raise _invalid(
                    f"'{param}' is an {kind} part, but this model is text-only: "
                    "send text content parts only",
                    param,
                )


def check_semantics(body: dict[str, Any], *, multimodal: bool = False) -> None:
    """Rules the JSON Schema cannot express; assumes the body already passed the schema.

    Type-tolerant anyway (values of the wrong type are skipped, not crashed on), so it
    is safe to call on its own.
    """
    for bound in BOUNDS:
        value = body.get(bound.field)
        if _is_number(value):
            message = bound.violation(value)
            if message:
                raise _invalid(message, bound.field)
    for check in CROSS_FIELD_CHECKS:
        check(body)
    _check_messages(body.get("messages"), multimodal)
    check_tools(body)


# --------------------------------------------------------------------------- validator


class RequestValidator:
    """Compiles the request schema once; `validate` is then safe to call per request."""

    def __init__(
        self,
        schema_path: str | os.PathLike[str] | None = None,
        *,
        multimodal: bool = False,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_bytes: int | None = None,
        max_values: int = DEFAULT_MAX_VALUES,
    ) -> None:
        self.schema = load_schema(schema_path)
        Draft202012Validator.check_schema(self.schema)
        self._validator = Draft202012Validator(self.schema)
        self.multimodal = multimodal
        self.max_depth = max_depth
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.max_values = max_values

    def validate(self, body: object) -> dict:
        """Raise RequestError (400) unless `body` is an acceptable chat completion request.

        Returns the body with explicit nulls on optional top-level fields
        removed: clients send `"temperature": null` to mean "not set", and the
        API treats both the same (the schema itself allows no nulls there).
        """
        if isinstance(body, dict):
            # Only known optional fields: an unknown key stays, null or not, and is refused.
            optional = set(self.schema.get("properties", {})) - set(self.schema.get("required", ()))
            body = {k: v for k, v in body.items() if v is not None or k not in optional}
        if not isinstance(body, dict):
            raise _invalid(
                f"The request body must be a JSON object, got {_WITH_ARTICLE.get(_json_type(body), _json_type(body))}",
                None,
            )
        check_depth(body, self.max_depth, max_bytes=self.max_bytes, max_values=self.max_values)
        error = best_match(self._validator.iter_errors(body))
        if error is not None:
            raise explain(error, self.schema)
        check_semantics(body, multimodal=self.multimodal)
        return body
