"""Chat messages -> prompt token ids, through the model's (or the request's) chat template."""

from __future__ import annotations

import functools
import json
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.control_tokens import PromptText, control_tokens
from flashserve.api.http.errors import RequestError


def flatten_content(content: Any) -> Any:
    """Text-part arrays become one string: text-only templates expect a string."""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "content": _template_content(m), **_template_tool_calls(m)} for m in messages]


def _template_content(message: dict[str, Any]) -> Any:
    """An assistant turn that only calls tools has `content: null` (what OpenAI clients
    send back). transformers drops None-valued keys before rendering, and templates that
    read `message['content']` (DeepSeek's) then fail on the missing key: "" renders."""
    content = flatten_content(message.get("content"))
    if content is None and message.get("tool_calls"):
        return ""
    return content


def _template_tool_calls(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends a call's `arguments` as a JSON string; chat templates (Qwen, Llama,
    Mistral) write them with `| tojson` and expect the object. Arguments that are not
    valid JSON stay the string the client sent."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return {}
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = arguments
            call = {**call, "function": {**function, "arguments": parsed}}
        out.append(call)
    return {"tool_calls": out}


def echo_prefix(request: ChatRequest) -> str | None:
    """With `echo`, the final assistant message's text, which the output continues; else None."""
    last = request.messages[-1] if request.messages else {}
    if not request.echo or last.get("role") != "assistant":
        return None
    text = flatten_content(last.get("content"))
    return text if isinstance(text, str) and text else None


def render_prompt(tokenizer: Any, request: ChatRequest) -> PromptText:
    """Render the conversation with the chat template; template faults are the caller's 400.

    With `echo` and a final assistant message, the prompt ends inside that
    message (no end-of-turn, no generation prompt) so the model continues it.
    Special-token strings in the request's values render as themselves but are marked
    as text in the returned PromptText (frontend/control_tokens.py): only the
    template's own markup becomes control tokens.
    """
    kwargs: dict[str, Any] = dict(request.chat_template_args or {})
    reserved = sorted(_RESERVED_TEMPLATE_ARGS.intersection(kwargs))
    if reserved:
        raise RequestError(
            f"chat_template_args may not set {', '.join(reserved)}: those are rendering "
            "options, not template variables (use the request fields of the same purpose)",
            param="chat_template_args",
        )
    if request.chat_template:
        check_template_source(request.chat_template)
    continuing = echo_prefix(request) is not None
    guard = control_tokens(tokenizer)
    shielded: list[str] = []
    try:
        rendered = tokenizer.apply_chat_template(
            guard.shield(template_messages(request.messages), shielded),
            # tool_choice "none": the model is not shown the tools, so it has no call to
            # make (docs/tools-and-reasoning.md); calls already in the history still render.
            tools=guard.shield(request.tools, shielded) if request.tool_choice != "none" else None,
            documents=guard.shield(request.documents, shielded),
            chat_template=request.chat_template,
            add_generation_prompt=request.add_generation_prompt and not continuing,
            continue_final_message=continuing,
            tokenize=False,
            **{name: guard.shield(value, shielded) for name, value in kwargs.items()},
        )
    except Exception as exc:  # noqa: BLE001 - the template and its inputs are the request's
        # Sandbox violations, syntax errors, raise_exception(), oversized
        # ranges, division by zero: whatever a template does wrong, the
        # request brought it (its own template, or messages the model's
        # template refuses), so it is a 400, never a 500.
        param = "chat_template" if request.chat_template else "messages"
        raise RequestError(
            f"The chat template could not render this conversation: {exc}", param=param
        ) from exc
    return guard.resolve(rendered, shielded)


@functools.lru_cache(maxsize=64)
def _template_violation(source: str) -> str | None:
    try:
        tree = _PARSER.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"syntax error on line {exc.lineno}: {exc.message}"
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:  # the attr filter: x|attr("__class__")
            first = node.args[0] if node.name == "attr" and node.args else None
            name = first.value if isinstance(first, nodes.Const) else None
        if isinstance(name, str) and name.startswith("_"):
            return f"it reads the private attribute {name!r}, which templates may not touch"
    return None


def check_template_source(source: str) -> None:
    """Refuse a request's template that reads private attributes (a sandbox escape attempt).

    The renderer's sandbox already blocks such access at run time, but
    silently in some cases (`{{ ''.__class__ }}` renders as nothing); this
    static check makes every attempt a clear 400.
    """
    problem = _template_violation(source)
    if problem:
        raise RequestError(f"chat_template is refused: {problem}", param="chat_template")


class _GenerationTag(Extension):
    """Parses `{% generation %}...{% endgeneration %}` (a transformers tag) as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# Only parses (never renders): the templates run in transformers' sandbox.
_PARSER = jinja2.Environment(extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])

# apply_chat_template's own parameters: as chat_template_args they would
# change how rendering works rather than pass a variable to the template.
_RESERVED_TEMPLATE_ARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def encode_prompt(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """The prompt's ids; in a rendered PromptText, the request's special-token strings
    are text. A plain str (a raw completion prompt) is tokenized as it is."""
    return control_tokens(tokenizer).encode(text, add_special_tokens)
