"""Tool-call output parsers, one module per model format (see base.py for the rules)."""

from flashserve.api.frontend.tool_parsers.base import ParsedText, ToolCallDelta, ToolParser
from flashserve.api.frontend.tool_parsers.deepseek import (
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
)
from flashserve.api.frontend.tool_parsers.glm import Glm45ToolParser
from flashserve.api.frontend.tool_parsers.hermes import HermesToolParser
from flashserve.api.frontend.tool_parsers.llama import Llama3JsonToolParser
from flashserve.api.frontend.tool_parsers.mistral import MistralToolParser
from flashserve.api.frontend.tool_parsers.registry import (
    TOOL_PARSERS,
    detect_tool_parser,
    resolve_tool_parser,
)

__all__ = [
    "TOOL_PARSERS",
    "DeepSeekV3ToolParser",
    "DeepSeekV31ToolParser",
    "Glm45ToolParser",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ParsedText",
    "ToolCallDelta",
    "ToolParser",
    "detect_tool_parser",
    "resolve_tool_parser",
]
