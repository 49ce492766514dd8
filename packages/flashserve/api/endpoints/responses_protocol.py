"""The Responses API request, mapped onto the chat-shaped request the shared path takes.

A Responses request is a conversation of items (messages, function calls and their
outputs, reasoning sent back), flat function tools, `text.format` and `reasoning`. Here
it becomes what chat already knows: messages for the chat template, tools in OpenAI's
function shape, a `response_format`, and template variables for thinking. Checks that
need the Responses field names run here too, and refusals raised further down the
shared path (which names chat's fields) are renamed to the Responses fields.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from flashserve.api.endpoints.reasoning_effort import thinking_variables
from flashserve.api.frontend.tools import check_tools
from flashserve.api.http.errors import RequestError
from flashserve.api.http.field_text import invalid_field

SCHEMA_FILENAME = "ResponsesRequest.schema.json"

# Input item types of OpenAI's API that belong to its hosted tools or its server state.
_HOSTED_ITEM_TYPES = frozenset(
    {
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "web_search_call",
        "tool_search_call",
        "tool_search_output",
        "image_generation_call",
        "code_interpreter_call",
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
        "custom_tool_call",
        "custom_tool_call_output",
        "additional_tools",
        "compaction",
        "compaction_trigger",
        "program",
        "program_output",
    }
)
_MEDIA_PART_TYPES = frozenset({"input_image", "input_file", "input_audio"})
LOGPROBS_INCLUDE = "message.output_text.logprobs"
ALLOWED_TOOLS = "allowed_tools"
ENCRYPTED_REASONING_INCLUDE = "reasoning.encrypted_content"
INCLUDABLE = (LOGPROBS_INCLUDE, ENCRYPTED_REASONING_INCLUDE)
# A reasoning item's `encrypted_content` here is its text, encoded, not encrypted: the
# text is in the item's `content` anyway. It lets clients that keep no state and send
# only `encrypted_content` back (store: false) continue a thinking turn.
_SEALED_PREFIX = "fsr1:"

# Chat's field paths (in refusals from the shared path) -> the Responses request's.
_PARAM_RENAMES = (
    (re.compile(r"^tools\[(\d+)\]\.function(?=\.)"), r"tools[\1]"),
    (re.compile(r"^tool_choice\.function\.name$"), "tool_choice.name"),
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format\.json_schema"), "text.format"),
    (re.compile(r"^response_format"), "text.format"),
    (re.compile(r"^messages(?=\[|$|\.)"), "input"),
    (re.compile(r"^max_tokens$"), "max_output_tokens"),
)
# The same paths quoted inside messages (only these unambiguous dotted forms).
_TEXT_RENAMES = (
    (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"\btool_choice\.function\.name\b"), "tool_choice.name"),
    (re.compile(r"\bresponse_format\.json_schema\.schema\b"), "text.format.schema"),
    (re.compile(r"\bresponse_format\b"), "text.format"),
)
# The shared path's context-length remedy names chat's field; this API's is `truncation`.
_PROMPT_REMEDY = re.compile(r"Shorten the input or set truncate_prompt_tokens\.")
_TRUNCATION_REMEDY = 'Shorten the input or set "truncation": "auto" to drop the oldest turns.'
_TRUNCATED_REMEDY = (
    'Shorten the input: "truncation": "auto" keeps at least the last user turn, and that '
    "alone is too long."
)


# --------------------------------------------------------------------------- checks


def with_item_types(body: Any) -> Any:
    """The body with `type: message` on input items that leave it out (OpenAI's "easy"
    messages), so that every item names its shape before the schema checks it."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return body
    typed = [
        {"type": "message", **item} if isinstance(item, dict) and "type" not in item else item
        for item in items
    ]
    return {**body, "input": typed}


def check_supported(body: Any) -> None:
    """Refuse what this server does not run, before the schema, so the 400 says why
    (the schema would only say that the value fits none of the shapes it knows)."""
    if not isinstance(body, dict):
        return
    items = body.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if not isinstance(kind, str):
            continue  # the schema names the bad type; a list or object cannot be looked up
        if kind in _HOSTED_ITEM_TYPES:
            raise invalid_field(
                f"'input[{i}]' is a {kind} item: this server runs function tools only, "
                "so it has no hosted-tool items to continue",
                f"input[{i}].type",
            )
        if kind == "item_reference":
            raise invalid_field(
                f"'input[{i}]' is an item_reference: this server keeps no items by id. "
                "Send the item itself, or continue with previous_response_id",
                f"input[{i}]",
            )
        sealed = item.get("encrypted_content") if kind == "reasoning" else None
        if isinstance(sealed, str) and unseal_reasoning(sealed) is None:
            raise invalid_field(
                f"'input[{i}].encrypted_content' was not issued by this server (it issues "
                f"'{_SEALED_PREFIX}...'); send the reasoning item's content instead",
                f"input[{i}].encrypted_content",
            )
        field = "content" if kind == "message" else "output"
        parts = item.get(field)
        for j, part in enumerate(parts if isinstance(parts, list) else ()):
            part_kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part_kind, str) and part_kind in _MEDIA_PART_TYPES:
                raise invalid_field(
                    f"'input[{i}].{field}[{j}]' is an {part_kind} part, but this model is "
                    "text-only: send input_text parts only",
                    f"input[{i}].{field}[{j}]",
                )
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise invalid_field(
                f"'tools[{i}].type' is {kind!r:.60}: this server runs function tools only "
                "(hosted tools such as web_search or file_search are OpenAI's)",
                f"tools[{i}].type",
            )
        if kind == "function" and "function" in tool:
            raise invalid_field(
                f"'tools[{i}]' has chat's shape ({{type, function: {{name, ...}}}}); the "
                "Responses API takes function tools flat: {type, name, description, "
                "parameters, strict}",
                f"tools[{i}].function",
            )
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("type"), str):
        if choice["type"] not in ("function", ALLOWED_TOOLS):
            raise invalid_field(
                f"'tool_choice.type' is {choice['type']!r:.60}: use 'none', 'auto', "
                '\'required\', {"type": "function", "name": ...} or '
                '{"type": "allowed_tools", "mode": ..., "tools": [...]}',
                "tool_choice.type",
            )


def check_rules(body: dict[str, Any], *, multimodal: bool = False) -> None:
    """What the schema cannot express, for a body that passed it."""
    if body.get("input") == [] and body.get("previous_response_id") is None:
        raise invalid_field(
            "'input' must hold at least one item (or continue a previous_response_id)", "input"
        )
    if body.get("background") is True:
        raise invalid_field(
            "'background' responses are not supported: this server answers while the "
            "request is open (stream it for long generations)",
            "background",
        )
    verbosity = (body.get("text") or {}).get("verbosity")
    if verbosity not in (None, "medium"):
        raise invalid_field(
            f"'text.verbosity' {verbosity!r} is not supported: open models have no "
            "verbosity control (use 'medium' or leave it out)",
            "text.verbosity",
        )
    for i, value in enumerate(body.get("include") or ()):
        if value not in INCLUDABLE:
            raise invalid_field(
                f"'include[{i}]' is {value!r:.80}: this server can include "
                + " and ".join(repr(name) for name in INCLUDABLE),
                f"include[{i}]",
            )
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == ALLOWED_TOOLS:
        declared = {tool["name"] for tool in body.get("tools") or ()}
        for i, tool in enumerate(choice["tools"]):
            if tool["name"] not in declared:
                param = f"tool_choice.tools[{i}].name"
                raise invalid_field(
                    f"'{param}' names {tool['name']!r:.80}, which is not a declared tool "
                    f"(declared: {', '.join(sorted(declared)) or 'none'})",
                    param,
                )
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise invalid_field(
            "'stream_options' is only allowed when 'stream' is true", "stream_options"
        )


def renamed(exc: RequestError, truncating: bool = False) -> RequestError:
    """A refusal from the shared path with its fields named as the Responses request has them.

    `truncating`: the request has truncation "auto", so a prompt still too long is its
    last user turn alone (the shared path's remedy, truncate_prompt_tokens, is chat's)."""
    param = exc.param
    for pattern, replacement in _PARAM_RENAMES if param else ():
        param = pattern.sub(replacement, param)
    message = exc.message
    for pattern, replacement in _TEXT_RENAMES:
        message = pattern.sub(replacement, message)
    message = _PROMPT_REMEDY.sub(_TRUNCATED_REMEDY if truncating else _TRUNCATION_REMEDY, message)
    if param == exc.param and message == exc.message:
        return exc
    return RequestError(message, param, exc.code, exc.status, exc.err_type, exc.headers)


# --------------------------------------------------------------------------- mapping


def input_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def to_messages(
    items: list[dict[str, Any]], instructions: str | None, first_new: int = 0
) -> list[dict[str, Any]]:
    """Items -> chat messages. An assistant turn's items (reasoning, text, function calls)
    join into one assistant message; a function_call_output becomes a tool message and
    must answer a call made earlier. Items before `first_new` come from a stored response
    (already checked); `input[i]` in refusals counts from `first_new`."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    calls: set[str] = set()
    for index, item in enumerate(items):
        kind = item["type"]
        last = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            content = _chat_content(item["content"])
            if role == "assistant" and last is not None and last["content"] is None:
                last["content"] = content  # the text after this turn's reasoning
            elif role == "assistant":
                messages.append({"role": "assistant", "content": content})
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            if last is None:
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
            calls.add(item["call_id"])
        elif kind == "function_call_output":
            call_id = item["call_id"]
            if call_id not in calls and index >= first_new:
                param = f"input[{index - first_new}].call_id"
                raise invalid_field(
                    f"'{param}' is {call_id!r:.80}, but no earlier function_call item "
                    "has that call_id",
                    param,
                )
            messages.append(
                {"role": "tool", "tool_call_id": call_id, "content": _chat_content(item["output"])}
            )
        elif kind == "reasoning":
            text = _reasoning_text(item)
            if last is not None and last["content"] is None and "tool_calls" not in last:
                last["reasoning_content"] = last.get("reasoning_content", "") + text
            else:
                messages.append({"role": "assistant", "content": None, "reasoning_content": text})
    for message in messages:
        if message["role"] == "assistant" and message["content"] is None:
            # Templates render content; only a calls-only turn may leave it null.
            message["content"] = None if message.get("tool_calls") else ""
    return messages


def truncation_points(items: list[dict[str, Any]]) -> list[int]:
    """Where a conversation may start once `truncation: auto` drops its oldest items: at
    its start or at a user message, so that no turn is cut in half."""
    return [0] + [
        i
        for i, item in enumerate(items)
        if i and item["type"] == "message" and item["role"] == "user"
    ]


def without_oldest(items: list[dict[str, Any]], cut: int) -> list[dict[str, Any]]:
    """The conversation from `cut` on, keeping the system and developer messages before it."""
    kept = [
        item
        for item in items[:cut]
        if item["type"] == "message" and item["role"] in ("system", "developer")
    ]
    return kept + items[cut:]


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Flat function tools {type, name, description, parameters, strict} -> chat's shape."""
    if tools is None:
        return None
    return [
        {
            "type": "function",
            "function": {
                key: tool[key]
                for key in ("name", "description", "parameters", "strict")
                if tool.get(key) is not None
            },
        }
        for tool in tools
    ]


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """tool_choice in chat's terms (allowed_tools: its mode; `allowed` keeps the tools)."""
    if isinstance(choice, dict) and choice["type"] == ALLOWED_TOOLS:
        return choice["mode"]
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def allowed(tools: list[dict[str, Any]] | None, choice: Any) -> list[dict[str, Any]] | None:
    """The tools the model may call: under allowed_tools only those listed, which are then
    the only ones the model is shown (so it cannot call the others)."""
    if tools is None or not isinstance(choice, dict) or choice["type"] != ALLOWED_TOOLS:
        return tools
    names = {tool["name"] for tool in choice["tools"]}
    return [tool for tool in tools if tool["name"] in names]


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` -> chat's `response_format`."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    json_schema = {"name": fmt["name"], "schema": fmt["schema"]}
    if fmt.get("description"):
        json_schema["description"] = fmt["description"]
    if fmt.get("strict"):
        json_schema["strict"] = True
    return {"type": "json_schema", "json_schema": json_schema}


def chat_fields(body: dict[str, Any], messages: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The chat request (ChatRequest fields) that generates what this request asks."""
    include_logprobs = LOGPROBS_INCLUDE in (body.get("include") or ())
    top_logprobs = body.get("top_logprobs") or 0
    fields: dict[str, Any] = {
        "model": body.get("model") or model,
        "messages": messages,
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tools": chat_tools(allowed(body.get("tools"), body.get("tool_choice"))),
        "tool_choice": chat_tool_choice(body.get("tool_choice")),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "response_format": response_format(body.get("text")),
        "chat_template_args": thinking_variables((body.get("reasoning") or {}).get("effort")),
        "logprobs": include_logprobs or top_logprobs > 0,
        "top_logprobs": top_logprobs,
        "stream": body.get("stream", False),
        "user": body.get("user") or body.get("safety_identifier"),
    }
    for name in (
        "seed",
        "top_k",
        "min_p",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "stop",
    ):
        if name in body:
            fields[name] = body[name]
    return {key: value for key, value in fields.items() if value is not None}


def check_chat_tools(fields: dict[str, Any]) -> None:
    """Tool names, parameter schemas and the named tool_choice, as chat checks them."""
    check_tools({key: fields[key] for key in ("tools", "tool_choice") if key in fields})


def _chat_content(content: str | list[dict[str, Any]]) -> str | list[dict[str, str]]:
    """Message or output content -> chat content: text parts stay parts (chat joins them)."""
    if isinstance(content, str):
        return content
    return [
        {"type": "text", "text": part["refusal"] if part["type"] == "refusal" else part["text"]}
        for part in content
    ]


def _reasoning_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or item.get("summary")
    if not parts and item.get("encrypted_content"):
        return unseal_reasoning(item["encrypted_content"]) or ""
    return "\n".join(part["text"] for part in parts or ())


def seal_reasoning(text: str) -> str:
    """A reasoning item's `encrypted_content` (see _SEALED_PREFIX)."""
    return _SEALED_PREFIX + base64.urlsafe_b64encode(text.encode()).decode()


def unseal_reasoning(sealed: str) -> str | None:
    """The text that `seal_reasoning` encoded; None for anything it did not make."""
    if not sealed.startswith(_SEALED_PREFIX):
        return None
    try:
        raw = base64.urlsafe_b64decode(sealed[len(_SEALED_PREFIX) :].encode())
        return raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
