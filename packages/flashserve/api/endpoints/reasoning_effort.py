"""OpenAI's reasoning effort -> whether a thinking model thinks.

Open models have a thinking switch, not a budget: the chat templates read one of these
variables (Qwen3 and GLM-4.5 `enable_thinking`, DeepSeek-V3.1 `thinking`). `none` and
`minimal` switch thinking off, every other effort switches it on. Used by /v1/responses
(`reasoning.effort`) and chat (`reasoning_effort`).
"""

from __future__ import annotations

EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
THINKING_OFF_EFFORTS = frozenset({"none", "minimal"})
THINKING_TEMPLATE_VARIABLES = ("enable_thinking", "thinking")


def thinking_variables(effort: str | None) -> dict[str, bool] | None:
    """The chat template variables for `effort` (None: leave the model's default)."""
    if effort is None:
        return None
    return dict.fromkeys(THINKING_TEMPLATE_VARIABLES, effort not in THINKING_OFF_EFFORTS)
