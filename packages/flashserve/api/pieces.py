"""What flows between the chat service and the response builders."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flashserve.api.output_formats import ParsingPlan
from flashserve.api.protocol import ChatRequest
from flashserve.api.tools import NONE, ToolPlan
from flashserve.engine.sampling_params import SamplingParams


@dataclass
class Piece:
    """One step of a request's output, as text."""

    text: str
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # context_only: the response's top-level `disaggregated_params` (the handle).
    disaggregated: dict | None = None
    # Thinking text (reasoning_content) and tool-call deltas read from this step's text.
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    reasoning_tokens: int = 0


@dataclass
class PreparedRequest:
    request: ChatRequest
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))
    # `echo`: the continued assistant message, which opens the response content.
    echo: str = ""
    # time.monotonic() past which the request is aborted (None: no deadline).
    deadline: float | None = None
    # What the request lets the model do with tools, and how its output is parsed.
    tools: ToolPlan = field(default_factory=lambda: ToolPlan(NONE))
    parsing: ParsingPlan = field(default_factory=ParsingPlan)
