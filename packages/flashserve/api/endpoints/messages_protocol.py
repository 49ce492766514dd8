"""The Anthropic Messages request: validated, then mapped onto chat's request.

A Messages conversation is a chat conversation in other clothes, so it is rendered by
the same chat template: `system` becomes a system message, `tool_use` blocks become the
assistant's `tool_calls`, `tool_result` blocks become `tool` messages, `thinking` blocks
sent back become the assistant's `reasoning_content`, and `thinking` switches the
template's `enable_thinking`. From the resulting `ChatRequest` on, the request takes
the shared generation path unchanged.

Validation: the JSON Schema in data/MessagesRequest.schema.json (unknown fields, types,
ranges), then the rules below it cannot express. Every refusal names the field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.request_schema import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_VALUES,
    REPO_SCHEMA_PATH,
    TRUSS_SCHEMA_PATH,
    check_depth,
    default_max_bytes,
    explain,
    load_schema,
)
from flashserve.api.frontend.tools import check_tools
from flashserve.api.http.errors import RequestError
from flashserve.api.http.field_text import invalid_field

SCHEMA_FILENAME = "MessagesRequest.schema.json"
SCHEMA_PATH_ENV = "FLASHSERVE_MESSAGES_SCHEMA_PATH"

USER, ASSISTANT = "user", "assistant"
MEDIA_BLOCKS = ("image", "document")
# Which content blocks each role may send.
BLOCKS_BY_ROLE = {
    USER: ("text", "image", "document", "tool_result"),
    ASSISTANT: ("text", "tool_use", "thinking", "redacted_thinking"),
}
# What a tool_result marked is_error reads as to the model (chat templates have no flag).
TOOL_ERROR_PREFIX = "Error: "


def find_schema_path() -> Path:
    """$FLASHSERVE_MESSAGES_SCHEMA_PATH, else the copy beside chat's schema (repo or Truss)."""
    from_env = os.environ.get(SCHEMA_PATH_ENV)
    if from_env:
        return Path(from_env)
    for folder in (REPO_SCHEMA_PATH.parent, TRUSS_SCHEMA_PATH.parent):
        if (folder / SCHEMA_FILENAME).is_file():
            return folder / SCHEMA_FILENAME
    raise FileNotFoundError(
        f"{SCHEMA_FILENAME} not found in {REPO_SCHEMA_PATH.parent} or "
        f"{TRUSS_SCHEMA_PATH.parent}; set {SCHEMA_PATH_ENV}"
    )


@dataclass(frozen=True)
class MessagesRequest:
    """A validated Messages request: chat's request plus what only this API has."""

    chat: ChatRequest
    model: str
    stream: bool
    # thinking.display "omitted": thinking blocks carry only their signature.
    omit_thinking: bool = False
    # thinking.budget_tokens: the most tokens the model may spend thinking.
    thinking_budget: int | None = None


class MessagesValidator:
    """Compiles the request schema once; `parse` is then safe to call per request."""

    def __init__(
        self,
        schema_path: str | os.PathLike[str] | None = None,
        *,
        max_bytes: int | None = None,
    ) -> None:
        self.schema = load_schema(schema_path or find_schema_path())
        Draft202012Validator.check_schema(self.schema)
        self._validator = Draft202012Validator(self.schema)
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    def parse(self, body: Any) -> MessagesRequest:
        """Raise RequestError (400) unless `body` is a request this server can answer."""
        if not isinstance(body, dict):
            raise invalid_field("The request body must be a JSON object", None)
        check_depth(
            body, DEFAULT_MAX_DEPTH, max_bytes=self.max_bytes, max_values=DEFAULT_MAX_VALUES
        )
        _check_tool_types(body)
        error = best_match(self._validator.iter_errors(body))
        if error is not None:
            raise explain(error, self.schema)
        _check_semantics(body)
        return to_messages_request(body)


# --------------------------------------------------------------------------- rules


def _check_tool_types(body: dict[str, Any]) -> None:
    """Server tools (web search, bash, ...) carry a versioned `type` and no input_schema;
    said before the schema check, which would only miss their input_schema."""
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type", "custom") if isinstance(tool, dict) else "custom"
        if isinstance(kind, str) and kind != "custom":
            raise invalid_field(
                f"'tools[{i}].type' is {json.dumps(kind[:80])}: this server runs client tools "
                'only (type "custom" or left out, with name, description and input_schema); '
                "Anthropic's server tools (web search, code execution, bash, text editor, "
                "computer use, ...) are not available",
                f"tools[{i}].type",
            )


def _check_semantics(body: dict[str, Any]) -> None:
    messages = body["messages"]
    calls: set[str] = set()
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        for j, block in enumerate(content if isinstance(content, list) else ()):
            kind, param = block["type"], f"messages[{i}].content[{j}]"
            if kind in MEDIA_BLOCKS:
                raise invalid_field(
                    f"'{param}' is {_article(kind)} {kind} block, but this model is text-only: send text "
                    "blocks only",
                    param,
                )
            if kind not in BLOCKS_BY_ROLE[role]:
                raise invalid_field(
                    f"'{param}' is a {kind} block, which a {role} message cannot hold "
                    f"({role} messages take {', '.join(BLOCKS_BY_ROLE[role])} blocks)",
                    param,
                )
            if kind == "tool_use":
                calls.add(block["id"])
            elif kind == "tool_result":
                _check_tool_result(block, calls, param)
    _check_answered(messages)
    last = messages[-1]
    if last["role"] == ASSISTANT and isinstance(last["content"], list):
        for j, block in enumerate(last["content"]):
            if block["type"] == "tool_use":
                param = f"messages[{len(messages) - 1}].content[{j}]"
                raise invalid_field(
                    f"'{param}': the final assistant message may prefill text only; a "
                    "tool_use must be answered by a user message with its tool_result",
                    param,
                )
    _check_thinking(body)
    _check_tools(body)


def _check_answered(messages: list[dict[str, Any]]) -> None:
    """As Anthropic: every tool_use of an assistant turn has its tool_result in the next
    turn, else the model would read a call that never returned. (A final assistant turn
    is checked elsewhere.)"""
    turns = _turns(messages)
    for (role, _, blocks), (_, first, reply) in zip(turns, turns[1:]):
        if role != ASSISTANT:
            continue
        answered = {b["tool_use_id"] for b in reply if b["type"] == "tool_result"}
        missing = [b["id"] for b in blocks if b["type"] == "tool_use" and b["id"] not in answered]
        if missing:
            param = f"messages[{first}].content"
            raise invalid_field(
                f"'{param}': tool_use ids were found without tool_result blocks immediately "
                f"after: {', '.join(repr(m[:80]) for m in missing[:4])}. Each tool_use "
                "block must have a corresponding tool_result block in the next message",
                param,
            )


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _check_tool_result(block: dict[str, Any], calls: set[str], param: str) -> None:
    if block["tool_use_id"] not in calls:
        raise invalid_field(
            f"'{param}.tool_use_id' is {block['tool_use_id']!r:.80}, but no earlier "
            "assistant message has a tool_use block with that id",
            f"{param}.tool_use_id",
        )
    content = block.get("content")
    for k, part in enumerate(content if isinstance(content, list) else ()):
        if part["type"] in MEDIA_BLOCKS:
            where = f"{param}.content[{k}]"
            raise invalid_field(
                f"'{where}' is {_article(part['type'])} {part['type']} block, but this model is text-only: send "
                "text blocks only",
                where,
            )


def _check_thinking(body: dict[str, Any]) -> None:
    thinking = body.get("thinking") or {}
    budget = thinking.get("budget_tokens")
    if budget is not None and budget >= body["max_tokens"]:
        raise invalid_field(
            f"'thinking.budget_tokens' ({budget}) must be less than 'max_tokens' "
            f"({body['max_tokens']}): thinking counts toward max_tokens",
            "thinking.budget_tokens",
        )


# Field names of chat's (OpenAI's) tool checks -> this API's, for their messages.
_TOOL_FIELDS = (
    (re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
    (re.compile(r"tools\[(\d+)\]\.function\.name"), r"tools[\1].name"),
    (re.compile(r"tool_choice\.function\.name"), "tool_choice.name"),
)


def _check_tools(body: dict[str, Any]) -> None:
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "any" and not body.get("tools"):
        raise invalid_field(
            '\'tool_choice\' is {"type": "any"} but the request declares no tools', "tool_choice"
        )
    try:
        check_tools(
            {"tools": _openai_tools(body.get("tools")), "tool_choice": _openai_tool_choice(choice)}
        )
    except RequestError as exc:
        raise rename_fields(exc, _TOOL_FIELDS) from exc


def rename_fields(exc: RequestError, renames: tuple[tuple[re.Pattern, str], ...]) -> RequestError:
    """`exc` with the shared path's (OpenAI) field names replaced by this API's."""
    message, param = exc.message, exc.param
    for pattern, replacement in renames:
        message = pattern.sub(replacement, message)
        param = pattern.sub(replacement, param) if param else param
    return RequestError(message, param=param, code=exc.code, status=exc.status)


# --------------------------------------------------------------------------- mapping


def to_messages_request(body: dict[str, Any]) -> MessagesRequest:
    """A body that passed validation -> chat's request and this API's own settings."""
    thinking = body.get("thinking") or {}
    enabled = {"enabled": True, "adaptive": True, "disabled": False}.get(thinking.get("type"))
    choice = body.get("tool_choice") or {}
    output_format = (body.get("output_config") or {}).get("format")
    fields: dict[str, Any] = {
        "model": body["model"],
        "messages": chat_messages(body.get("system"), body["messages"]),
        "max_tokens": body["max_tokens"],
        "stop": body.get("stop_sequences") or None,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "seed": body.get("seed"),
        "tools": _openai_tools(body.get("tools")),
        "tool_choice": _openai_tool_choice(choice),
        "parallel_tool_calls": not choice.get("disable_parallel_tool_use", False),
        "user": (body.get("metadata") or {}).get("user_id"),
        "stream": body.get("stream", False),
        # A final assistant message is a prefill: the reply continues it (chat's echo
        # renders it so; the formatter leaves it out of the reply, as Anthropic does).
        "echo": body["messages"][-1]["role"] == ASSISTANT,
    }
    if enabled is not None:
        fields["chat_template_args"] = {"enable_thinking": enabled}
    if output_format is not None:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": output_format["schema"], "strict": True},
        }
    chat = ChatRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    return MessagesRequest(
        chat=chat,
        model=body["model"],
        stream=bool(body.get("stream", False)),
        omit_thinking=thinking.get("display") == "omitted",
        thinking_budget=thinking.get("budget_tokens"),
    )


def _openai_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for tool in tools:
        function = {"name": tool["name"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        function["parameters"] = tool["input_schema"]  # after the description, as OpenAI's
        out.append({"type": "function", "function": function})
    return out


def _openai_tool_choice(choice: dict[str, Any]) -> str | dict[str, Any] | None:
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind)


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    """(role, index of its first message, blocks) per turn: consecutive messages of one
    role are one turn (Anthropic combines them too)."""
    turns: list[tuple[str, int, list[dict[str, Any]]]] = []
    for i, message in enumerate(messages):
        if turns and turns[-1][0] == message["role"]:
            turns[-1][2].extend(_blocks(message["content"]))
        else:
            turns.append((message["role"], i, list(_blocks(message["content"]))))
    return turns


def _text_of(blocks: list[dict[str, Any]]) -> str:
    return "\n".join(block["text"] for block in blocks if block["type"] == "text")


def chat_messages(
    system: str | list[dict[str, Any]] | None, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Anthropic's system + messages -> chat messages, in the order they were said.

    Consecutive turns of one role are one turn (Anthropic combines them too). A user
    turn's tool_result blocks become `tool` messages where they stand, its text user
    messages; an assistant turn's text, thinking and tool_use blocks become one assistant
    message (content, reasoning_content, tool_calls).
    """
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text_of(_blocks(system))})
    for role, _, blocks in _turns(messages):
        if role == ASSISTANT:
            out.append(_assistant_message(blocks))
        else:
            out.extend(_user_messages(blocks))
    return out


def _assistant_message(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(block["text"] for block in blocks if block["type"] == "text")
    thinking = "\n".join(block["thinking"] for block in blocks if block["type"] == "thinking")
    calls = [
        {
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"])},
        }
        for block in blocks
        if block["type"] == "tool_use"
    ]
    message: dict[str, Any] = {"role": ASSISTANT, "content": text or (None if calls else "")}
    if thinking:
        message["reasoning_content"] = thinking
    if calls:
        message["tool_calls"] = calls
    return message


def _user_messages(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in blocks:
        if block["type"] == "text":
            texts.append(block["text"])
            continue
        if texts:
            out.append({"role": USER, "content": "\n".join(texts)})
            texts = []
        content = block.get("content", "")
        text = content if isinstance(content, str) else _text_of(content)
        if block.get("is_error"):
            text = TOOL_ERROR_PREFIX + text
        out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
    if texts:
        out.append({"role": USER, "content": "\n".join(texts)})
    return out
