"""Tool-call parsers by name, and the choice of one for a model (`tool_call_parser`)."""

from __future__ import annotations

from flashserve.api.frontend.tool_parsers.base import ToolParser
from flashserve.api.frontend.tool_parsers.hermes import HermesToolParser
from flashserve.api.frontend.tool_parsers.llama import Llama3JsonToolParser
from flashserve.api.frontend.tool_parsers.mistral import MistralToolParser

# Names accepted in config.yaml; aliases are the model families that use each format.
TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,
    "qwen2": HermesToolParser,
    "qwen3": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "llama": Llama3JsonToolParser,
    "llama3": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}
AUTO = "auto"
DISABLED = ("none", "", None)


def detect_tool_parser(chat_template: str | None) -> type[ToolParser] | None:
    """The format a chat template writes tool calls in, judged by the markup it uses."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HermesToolParser
    if "[TOOL_CALLS]" in chat_template:
        return MistralToolParser
    llama_header = "<|start_header_id|>" in chat_template
    if "<|python_tag|>" in chat_template or (llama_header and '"parameters"' in chat_template):
        return Llama3JsonToolParser
    return None


def resolve_tool_parser(setting: str | None, chat_template: str | None) -> type[ToolParser] | None:
    """The parser class for a `tool_call_parser` setting ("auto": from the template)."""
    if setting in DISABLED:
        return None
    if setting == AUTO:
        return detect_tool_parser(chat_template)
    try:
        return TOOL_PARSERS[setting]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(
            f"unknown tool_call_parser {setting!r}: use auto, none or one of {known}"
        ) from None
