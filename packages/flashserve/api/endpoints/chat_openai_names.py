"""OpenAI chat fields that Baseten's published schema leaves out, taken under the names it
has, so that current `openai` clients work unchanged:

- `max_completion_tokens` -> `max_tokens` (OpenAI's name since `max_tokens` was deprecated);
- the `developer` role -> `system` (OpenAI's name for system messages to newer models);
- `reasoning_effort` -> the template's thinking switch, as /v1/responses' `reasoning.effort`;
- `response_format.json_schema.strict: false` (OpenAI's default; the schema allows only
  `true`) -> no `strict`, which means the same: JSON Schema's own defaults.

They are translated before the schema checks the body, so data/ keeps the published
schema, and a refusal of a translated field names the field the client sent.
"""

from __future__ import annotations

import re
from typing import Any

from flashserve.api.endpoints.reasoning_effort import EFFORTS, thinking_variables
from flashserve.api.http.errors import RequestError
from flashserve.api.http.field_text import invalid_field, short_value

MAX_COMPLETION_TOKENS = "max_completion_tokens"
REASONING_EFFORT = "reasoning_effort"
DEVELOPER_ROLE = "developer"


def translate(body: Any) -> tuple[Any, dict[str, str]]:
    """`body` with OpenAI's names turned into the schema's, and {schema name: client name}
    for each field renamed. Type-tolerant: wrong types are left for the schema to refuse."""
    if not isinstance(body, dict):
        return body, {}
    body = dict(body)
    renames: dict[str, str] = {}
    if body.get(MAX_COMPLETION_TOKENS) is None:
        body.pop(MAX_COMPLETION_TOKENS, None)
    else:
        value = body.pop(MAX_COMPLETION_TOKENS)
        if body.get("max_tokens") not in (None, value):
            raise invalid_field(
                f"'{MAX_COMPLETION_TOKENS}' ({short_value(value)}) and 'max_tokens' "
                f"({short_value(body['max_tokens'])}) disagree: send one of them",
                MAX_COMPLETION_TOKENS,
            )
        body["max_tokens"] = value
        renames["max_tokens"] = MAX_COMPLETION_TOKENS
    effort = body.pop(REASONING_EFFORT, None)
    if effort is not None:
        body["chat_template_args"] = _with_effort(effort, body.get("chat_template_args"))
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [_as_system(message) for message in messages]
    if "response_format" in body:
        body["response_format"] = _without_strict_false(body["response_format"])
    return body, renames


def with_client_names(exc: RequestError, renames: dict[str, str]) -> RequestError:
    """`exc` naming the fields as the client sent them (`max_completion_tokens`)."""
    if not renames:
        return exc
    param, message = exc.param, exc.message
    for schema_name, client_name in renames.items():
        if param == schema_name:
            param = client_name
        message = re.sub(rf"'{schema_name}'", f"'{client_name}'", message)
    return RequestError(message, param, exc.code, exc.status, exc.err_type, exc.headers)


def _with_effort(effort: Any, template_args: Any) -> Any:
    if effort not in EFFORTS:
        allowed = ", ".join(f'"{name}"' for name in EFFORTS)
        raise invalid_field(
            f"'{REASONING_EFFORT}' must be one of {allowed}, got {short_value(effort)}",
            REASONING_EFFORT,
        )
    if template_args is not None and not isinstance(template_args, dict):
        return template_args  # the schema refuses it, naming chat_template_args
    # Variables the request sets itself in chat_template_args win over the effort's.
    return {**(thinking_variables(effort) or {}), **(template_args or {})}


def _without_strict_false(response_format: Any) -> Any:
    json_schema = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if not isinstance(json_schema, dict) or json_schema.get("strict") is not False:
        return response_format
    lenient = {key: value for key, value in json_schema.items() if key != "strict"}
    return {**response_format, "json_schema": lenient}


def _as_system(message: Any) -> Any:
    if isinstance(message, dict) and message.get("role") == DEVELOPER_ROLE:
        return {**message, "role": "system"}
    return message
