"""/v1/completions rules its JSON Schema cannot express: chat's numeric bounds and
cross-field rules on the fields the two share, and the combinations completions refuses."""

from __future__ import annotations

from typing import Any

from flashserve.api.endpoints.chat_rules import BOUNDS, CROSS_FIELD_CHECKS, Bound, check_bounds
from flashserve.api.endpoints.completions_protocol import DEFAULT_MAX_TOKENS
from flashserve.api.http.field_text import invalid_field

COMPLETION_BOUNDS = (
    *(bound for bound in BOUNDS if bound.field != "n"),
    Bound("n", 1, 1, why="one completion per prompt is supported; send several prompts instead"),
)


def _check_echo_logprobs(body: dict[str, Any]) -> None:
    if body.get("echo") is True and body.get("logprobs") is not None:
        raise invalid_field(
            "'echo' cannot be combined with 'logprobs': this server does not score prompt "
            "tokens, only generated ones. Drop 'echo' (the prompt is yours already) or "
            "'logprobs'.",
            "logprobs",
        )


def _check_suffix(body: dict[str, Any]) -> None:
    if body.get("suffix") is not None and body.get("truncate_prompt_tokens") is not None:
        raise invalid_field(
            "'truncate_prompt_tokens' cannot be combined with 'suffix': a fill-in-the-middle "
            "prompt cut from the left would lose its markers. Shorten the prompt or suffix.",
            "truncate_prompt_tokens",
        )


def check_completion_semantics(body: dict[str, Any]) -> None:
    """Rules the schema cannot express; assumes the body already passed the schema."""
    check_bounds(body, COMPLETION_BOUNDS)
    # Chat's cross-field rules read max_tokens: here it has a default of its own.
    with_defaults = {"max_tokens": DEFAULT_MAX_TOKENS, **body}
    for check in CROSS_FIELD_CHECKS:
        check(with_defaults)
    _check_echo_logprobs(body)
    _check_suffix(body)
