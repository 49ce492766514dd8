"""The generation settings every endpoint shares, as one typed request.

Each endpoint's protocol module turns its own request shape into these fields (chat's
ChatRequest is a subclass: its fields have the same names); from here on nothing
depends on which API the request came through.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StreamOptions(BaseModel):
    include_usage: bool = True
    continuous_usage_stats: bool = True


class GenerationOptions(BaseModel):
    # The endpoint's schema already rejected unknown fields; here we only give them types.
    model_config = ConfigDict(extra="ignore")

    # Sampling (frontend/params.py turns these into the engine's SamplingParams).
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    top_p_min: float = 0.0
    min_p: float | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None
    disaggregated_params: dict[str, Any] | None = None
    # Tools the model may call (OpenAI function-tool shape) and how it may call them.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # Text output (frontend/output/text_output.py).
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # The prompt's tokens.
    add_special_tokens: bool = False
    truncate_prompt_tokens: int | None = None
    # Delivery and logging.
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats
