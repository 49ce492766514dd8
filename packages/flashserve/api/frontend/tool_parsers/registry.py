"""Tool-call parsers by name, and the choice of one for a model (`tool_call_parser`)."""

from __future__ import annotations

from flashserve.api.frontend.tool_parsers.base import ToolParser
from flashserve.api.frontend.tool_parsers.deepseek import (
    CALLS_BEGIN,
    FENCE,
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
)
from flashserve.api.frontend.tool_parsers.glm import Glm45ToolParser
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
    "glm45": Glm45ToolParser,
    "glm4_moe": Glm45ToolParser,
    "glm46": Glm45ToolParser,
    "deepseek_v31": DeepSeekV31ToolParser,
    "deepseek_v3_1": DeepSeekV31ToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,
    "deepseek_r1": DeepSeekV3ToolParser,
}
AUTO = "auto"
DISABLED = ("none", "", None)


def detect_tool_parser(chat_template: str | None) -> type[ToolParser] | None:
    """The format a chat template writes tool calls in, judged by the markup it uses."""
    if not chat_template:
        return None
    # GLM's calls also open with <tool_call>: its argument tags tell it from Hermes.
    if "<arg_key>" in chat_template:
        return Glm45ToolParser
    if CALLS_BEGIN in chat_template:
        # V3 and R1 fence the arguments as ```json; V3.1 writes them bare.
        return DeepSeekV3ToolParser if FENCE + "json" in chat_template else DeepSeekV31ToolParser
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
