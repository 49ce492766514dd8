"""Tools in a request: checking their definitions, and reading what `tool_choice` asks for.

`check_tools` runs with the other semantic checks (endpoints/request_schema.py, endpoints/chat_rules.py), after the JSON Schema
has accepted the body's shape; every refusal is a 400 naming the field. `plan_tools`
then turns the typed request into a `ToolPlan` for the rest of the pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from flashserve.api.http.errors import RequestError

# OpenAI's rule (letters, digits, "_" and "-", at most 64), plus "." for namespaced
# tools ("github.search"), which MCP clients send.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

NONE, AUTO, REQUIRED, FUNCTION = "none", "auto", "required", "function"


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any]  # {} when the definition has none


@dataclass(frozen=True)
class ToolPlan:
    """What the request allows the model to do with tools."""

    choice: str  # none | auto | required | function
    tools: tuple[ToolSpec, ...] = ()
    forced: str | None = None  # the function a named tool_choice calls
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.choice != NONE and bool(self.tools)

    @property
    def constrained(self) -> bool:
        """Whether decoding must produce calls (required, or a named function)."""
        return self.choice in (REQUIRED, FUNCTION)

    @property
    def max_calls(self) -> int | None:
        return 1 if self.forced is not None or not self.parallel else None

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        if self.forced is None:
            return self.tools
        return tuple(tool for tool in self.tools if tool.name == self.forced)


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool) -> ToolPlan:
    """The ToolPlan of a request that passed `check_tools`."""
    specs = tuple(
        ToolSpec(t["function"]["name"], t["function"].get("parameters") or {}) for t in tools or ()
    )
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        return ToolPlan(FUNCTION, specs, forced=name, parallel=False)
    if tool_choice is None:
        tool_choice = AUTO if specs else NONE
    return ToolPlan(tool_choice, specs, parallel=parallel)


# --------------------------------------------------------------------------- checks


def check_tools(body: dict[str, Any]) -> None:
    """Tool definitions, tool_choice and tool messages that the schema cannot judge."""
    tools = body.get("tools")
    names = _check_definitions(tools if isinstance(tools, list) else [])
    _check_choice(body.get("tool_choice"), names, "tools" in body)
    messages = body.get("messages")
    if isinstance(messages, list):
        _check_tool_messages(messages)


def _check_definitions(tools: list[Any]) -> set[str]:
    names: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            continue
        name, param = function.get("name"), f"tools[{i}].function.name"
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _invalid(
                f"'{param}' must be 1 to 64 letters, digits, '_', '-' or '.', got {name!r:.80}",
                param,
            )
        if name in names:
            raise _invalid(f"'{param}': two tools are named {name!r}; names must be unique", param)
        names.add(name)
        if "parameters" in function:
            _check_parameters(function["parameters"], f"tools[{i}].function.parameters")
    return names


def _check_parameters(schema: Any, param: str) -> None:
    if not isinstance(schema, dict):
        return  # the request schema already requires an object
    kind = schema.get("type", "object")
    if kind != "object":
        raise _invalid(
            f"'{param}' must describe an object (the arguments), got type {kind!r}", param
        )
    # validator_for crashes on a non-string $schema; the 2020-12 meta-schema refuses it.
    default = jsonschema.Draft202012Validator
    validator = (
        jsonschema.validators.validator_for(schema, default=default)
        if isinstance(schema.get("$schema", ""), str)
        else default
    )
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = exc.json_path.replace("$", "#", 1)
        raise _invalid(
            f"'{param}' is not a valid JSON Schema: {exc.message} (at {where})", param
        ) from exc


def _check_choice(choice: Any, names: set[str], has_tools: bool) -> None:
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            param = "tool_choice.function.name"
            declared = ", ".join(sorted(names)) or "none"
            raise _invalid(
                f"'{param}' names {name!r:.80}, which is not a declared tool (declared: {declared})",
                param,
            )
    elif choice == REQUIRED and not names:
        raise _invalid(
            "'tool_choice' is 'required' but the request declares no tools"
            + ("" if has_tools else " (set 'tools')"),
            "tool_choice",
        )


def _check_tool_messages(messages: list[Any]) -> None:
    """Every tool result must answer a call made by an earlier assistant message."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    calls.add(call["id"])
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if isinstance(call_id, str) and call_id not in calls:
                param = f"messages[{i}].tool_call_id"
                raise _invalid(
                    f"'{param}' is {call_id!r:.80}, but no earlier assistant message has a "
                    "tool call with that id",
                    param,
                )


def _invalid(message: str, param: str) -> RequestError:
    return RequestError(message, param=param, code="invalid_request")
