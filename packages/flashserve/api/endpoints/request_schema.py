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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from flashserve.api.endpoints.chat_rules import check_semantics
from flashserve.api.http.errors import RequestError
from flashserve.api.http.field_text import (
    format_path,
    invalid_field,
    short_value,
)

SCHEMA_FILENAME = "ChatCompletionRequest.schema.json"
SCHEMA_PATH_ENV = "FLASHSERVE_SCHEMA_PATH"
MAX_BYTES_ENV = "FLASHSERVE_MAX_REQUEST_BYTES"
# packages/flashserve/api/endpoints/request_schema.py -> the repository root holds data/.
REPO_SCHEMA_PATH = Path(__file__).resolve().parents[4] / "data" / SCHEMA_FILENAME
# In the Truss serving image data/ is copied to /app/data while the package lives
# under /packages, so the repo-relative path does not exist there.
TRUSS_SCHEMA_PATH = Path("/app/data") / SCHEMA_FILENAME

DEFAULT_MAX_DEPTH = 64
# Generous because multimodal requests carry base64 images and audio inline.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# Far above real requests (long chats, big tool schemas) yet keeps jsonschema well under 1 s.
DEFAULT_MAX_VALUES = 100_000


# --------------------------------------------------------------------------- loading


def find_schema_path(
    path: str | os.PathLike[str] | None = None, filename: str = SCHEMA_FILENAME
) -> Path:
    """Where the schema is: `path`, else (chat's) $FLASHSERVE_SCHEMA_PATH, else the repo
    or Truss copy of `filename` (another endpoint's schema lives beside chat's in data/)."""
    if path is not None:
        return Path(path)
    from_env = os.environ.get(SCHEMA_PATH_ENV)
    if from_env and filename == SCHEMA_FILENAME:
        return Path(from_env)
    candidates = (REPO_SCHEMA_PATH.with_name(filename), TRUSS_SCHEMA_PATH.with_name(filename))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{filename} not found at {candidates[0]} or {candidates[1]}; set {SCHEMA_PATH_ENV}"
    )


@functools.lru_cache(maxsize=4)
def _read_schema(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def load_schema(
    path: str | os.PathLike[str] | None = None, filename: str = SCHEMA_FILENAME
) -> dict[str, Any]:
    """The request schema, read once per file. Shared between callers: do not mutate it."""
    return _read_schema(find_schema_path(path, filename).resolve())


def default_max_bytes() -> int:
    """The request size limit: $FLASHSERVE_MAX_REQUEST_BYTES or DEFAULT_MAX_BYTES."""
    return int(os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)


# --------------------------------------------------------------------------- helpers


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
            raise invalid_field(f"{where} is nested more than {max_depth} levels deep", field)
        values += len(node)
        if max_values is not None and values > max_values:
            where = f" (limit reached in '{field}')" if field else ""
            raise invalid_field(
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
                    raise invalid_field(f"'{owner}' contains a non-finite number ({value})", owner)
        if max_bytes is not None and size > max_bytes:
            raise invalid_field(f"The request body is larger than the {max_bytes}-byte limit", None)


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
            value=short_value(instance),
            size=len(instance) if hasattr(instance, "__len__") else "?",
            choices=_join_or([short_value(c) for c in choices])
            if isinstance(choices, list)
            else "",
        )
        return param, message
    return param, f"Invalid value for {where}: {short_value(error.message, 200)}"


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
        return [short_value(schema["const"])]
    if "enum" in schema:
        return [short_value(choice) for choice in schema["enum"]]
    kind = schema.get("type")
    properties = schema.get("properties", {})
    if kind == "object" and _tag(schema) is not None:
        fields = [f'"type": {short_value(_tag(schema))}']
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
        return invalid_field(message, param)

    where = format_path(union.absolute_path)
    shapes = _join_or([text for branch in union.validator_value for text in _shapes(branch, root)])
    detail: ValidationError | None = error
    if error is union:
        branch = _intended_branch(union)
        detail = best_match(branch) if branch else None
        if detail is not None and detail.validator in _UNIONS:
            return explain(detail, root)  # e.g. one bad part inside `content`
    if detail is None:
        return invalid_field(f"Invalid value for '{where}': expected {shapes}", where)
    param, message = _reason(detail)
    return invalid_field(f"{message}. '{where}' accepts {shapes}", param)


# --------------------------------------------------------------------------- validator


class RequestValidator:
    """Compiles the request schema once; `validate` is then safe to call per request.

    Chat's by default; another endpoint passes its schema's `schema_filename` and its
    own `semantics` (the rules its schema cannot express).
    """

    def __init__(
        self,
        schema_path: str | os.PathLike[str] | None = None,
        *,
        multimodal: bool = False,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_bytes: int | None = None,
        max_values: int = DEFAULT_MAX_VALUES,
        schema_filename: str = SCHEMA_FILENAME,
        semantics: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.schema = load_schema(schema_path, schema_filename)
        Draft202012Validator.check_schema(self.schema)
        self._validator = Draft202012Validator(self.schema)
        self.multimodal = multimodal
        self.max_depth = max_depth
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self.max_values = max_values
        self.semantics = semantics or functools.partial(check_semantics, multimodal=multimodal)

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
            raise invalid_field(
                f"The request body must be a JSON object, got {_WITH_ARTICLE.get(_json_type(body), _json_type(body))}",
                None,
            )
        check_depth(body, self.max_depth, max_bytes=self.max_bytes, max_values=self.max_values)
        error = best_match(self._validator.iter_errors(body))
        if error is not None:
            raise explain(error, self.schema)
        self.semantics(body)
        return body
