"""Request rules the JSON Schema cannot express: ranges it leaves open, cross-field
rules, message content a text-only model cannot take, and tool definitions."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flashserve.api.frontend.tools import check_tools
from flashserve.api.http.field_text import format_path, invalid_field, is_number, short_value


@dataclass(frozen=True)
class Bound:
    """A numeric range a field must lie in when present (None = unbounded)."""

    field: str
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    why: str = ""

    def violation(self, value: float) -> str | None:
        too_low = self.low is not None and (
            value <= self.low if self.low_exclusive else value < self.low
        )
        too_high = self.high is not None and value > self.high
        if not (too_low or too_high):
            return None
        if self.low == self.high:
            rule = f"must be {self.low}"
        elif self.low is not None and self.high is not None:
            rule = f"must be between {self.low} and {self.high}"
        elif self.low is not None:
            rule = f"must be {'greater than' if self.low_exclusive else 'at least'} {self.low}"
        else:
            rule = f"must be at most {self.high}"
        why = f" ({self.why})" if self.why else ""
        return f"'{self.field}' {rule}, got {short_value(value)}{why}"


BOUNDS = (
    Bound("n", 1, 1, why="only one completion per request is supported"),
    Bound("best_of", 1, 1, why="only best_of=1 is supported"),
    Bound("top_logprobs", 0, 20),
    Bound("min_tokens", 0),
    Bound("top_k", -1, why="-1 or 0 disables top-k sampling"),
    Bound("min_p", 0, 1),
    Bound("top_p_min", 0, 1),
    Bound("repetition_penalty", 0, low_exclusive=True),
    Bound("frequency_penalty", -2, 2),
    Bound("presence_penalty", -2, 2),
    # The engine seeds a torch.Generator, which takes 64 bits (signed or not).
    Bound("seed", -(2**63), 2**64 - 1, why="a 64-bit integer"),
)


def check_bounds(body: dict[str, Any], bounds: tuple[Bound, ...]) -> None:
    """Refuse the first numeric field of `body` outside its bound (other types are skipped)."""
    for bound in bounds:
        value = body.get(bound.field)
        if is_number(value):
            message = bound.violation(value)
            if message:
                raise invalid_field(message, bound.field)


TOKEN_ID_LISTS = ("bad_token_ids", "stop_token_ids")
MEDIA_PART_TYPES = ("image_url", "input_audio")
LOGIT_BIAS_LIMIT = 100
_TOKEN_ID_KEY = re.compile(r"[0-9]+")


def _check_top_logprobs(body: dict[str, Any]) -> None:
    top = body.get("top_logprobs")
    if is_number(top) and top > 0 and body.get("logprobs") is not True:
        raise invalid_field("'top_logprobs' requires 'logprobs': true", "top_logprobs")


def _check_min_tokens(body: dict[str, Any]) -> None:
    low, high = body.get("min_tokens"), body.get("max_tokens")
    if is_number(low) and is_number(high) and low > high:
        raise invalid_field(
            f"'min_tokens' ({low}) must not be greater than 'max_tokens' ({high})", "min_tokens"
        )


def _check_top_p_min(body: dict[str, Any]) -> None:
    floor, top_p = body.get("top_p_min"), body.get("top_p", 1)
    if is_number(floor) and is_number(top_p) and floor > top_p:
        raise invalid_field(
            f"'top_p_min' ({floor}) must not be greater than 'top_p' ({top_p})", "top_p_min"
        )


def _check_stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise invalid_field(
            "'stream_options' is only allowed when 'stream' is true", "stream_options"
        )


def _check_logit_bias(body: dict[str, Any]) -> None:
    bias = body.get("logit_bias")
    if not isinstance(bias, dict):
        return
    for key, value in bias.items():
        param = format_path(["logit_bias", key])
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise invalid_field(
                f"Invalid key in '{param}': logit_bias keys must be token IDs "
                "(non-negative integers written as strings)",
                param,
            )
        if is_number(value) and not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise invalid_field(
                f"'{param}' must be between -{LOGIT_BIAS_LIMIT} and {LOGIT_BIAS_LIMIT}, "
                f"got {short_value(value)}",
                param,
            )


def _check_token_ids(body: dict[str, Any]) -> None:
    # Only the sign here: the vocabulary size is known to the engine, which checks it.
    for name in TOKEN_ID_LISTS:
        ids = body.get(name)
        for index, token in enumerate(ids if isinstance(ids, list) else ()):
            if is_number(token) and token < 0:
                raise invalid_field(
                    f"'{name}[{index}]' must be a token ID (>= 0), got {token}",
                    f"{name}[{index}]",
                )


CROSS_FIELD_CHECKS: tuple[Callable[[dict[str, Any]], None], ...] = (
    _check_top_logprobs,
    _check_min_tokens,
    _check_top_p_min,
    _check_stream_options,
    _check_logit_bias,
    _check_token_ids,
)


def _check_messages(messages: Any, multimodal: bool) -> None:
    if not isinstance(messages, list):
        return
    if not messages:
        raise invalid_field("'messages' must contain at least one message", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id"), str):
            param = f"messages[{i}].tool_call_id"
            raise invalid_field(
                f"Missing required field '{param}': a tool message must name the tool call "
                "it answers",
                param,
            )
        parts = message.get("content")
        for j, part in enumerate(parts if isinstance(parts, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PART_TYPES and not multimodal:
                param = f"messages[{i}].content[{j}]"
                raise invalid_field(
                    f"'{param}' is an {kind} part, but this model is text-only: "
                    "send text content parts only",
                    param,
                )


def check_semantics(body: dict[str, Any], *, multimodal: bool = False) -> None:
    """Rules the JSON Schema cannot express; assumes the body already passed the schema.

    Type-tolerant anyway (values of the wrong type are skipped, not crashed on), so it
    is safe to call on its own.
    """
    check_bounds(body, BOUNDS)
    for check in CROSS_FIELD_CHECKS:
        check(body)
    _check_messages(body.get("messages"), multimodal)
    check_tools(body)
