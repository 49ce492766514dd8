"""`disaggregated_params`: the request's half of a prefill/decode split, and the handle it returns.

- `context_only`: run the prompt, return the first token and a handle
  (`ctx_request_id`, `opaque_state`); the replica keeps the KV blocks for a
  while (engine/disaggregation.py).
- `generation_only` with that handle and the same messages: continue decoding
  from the kept blocks on the same replica. An unknown, used or expired
  handle is a 400.
- `context_and_generation` (or no field): an ordinary request.

`first_gen_tokens` in a generation_only request is informational (the replica
kept the real first token); `draft_tokens` (speculative decoding) and the
multimodal handles are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from flashserve.api.http.errors import RequestError
from flashserve.engine.disaggregation import (
    CONTEXT_ONLY,
    GENERATION_ONLY,
    ContextHandle,
    DisaggregatedRequest,
)

CONTEXT_AND_GENERATION = "context_and_generation"
_PARAM = "disaggregated_params"


def parse_disaggregated(raw: dict[str, Any] | None) -> DisaggregatedRequest | None:
    if not raw:
        return None
    kind = raw.get("request_type")
    if kind == CONTEXT_AND_GENERATION:
        return None
    if kind == CONTEXT_ONLY:
        return DisaggregatedRequest(CONTEXT_ONLY)
    if kind == GENERATION_ONLY:
        ctx_id, state = raw.get("ctx_request_id"), raw.get("opaque_state")
        if ctx_id is None or state is None:
            raise RequestError(
                "A generation_only request needs the ctx_request_id and opaque_state its "
                "context_only request returned",
                param=_PARAM,
            )
        return DisaggregatedRequest(GENERATION_ONLY, ContextHandle(int(ctx_id), str(state)))
    raise RequestError(
        f"{_PARAM}.request_type must be {CONTEXT_ONLY!r}, {GENERATION_ONLY!r} or "
        f"{CONTEXT_AND_GENERATION!r}, got {kind!r}",
        param=f"{_PARAM}.request_type",
    )


def unknown_context_error(handle: ContextHandle) -> RequestError:
    return RequestError(
        f"{_PARAM}: context {handle.ctx_request_id} is not parked on this replica "
        "(unknown handle, already resumed, or expired); rerun the context_only request",
        param=_PARAM,
        code="unknown_context",
    )


def handle_body(handle: ContextHandle, first_token_ids: list[int]) -> dict[str, Any]:
    """The response's top-level `disaggregated_params` after a context_only request."""
    return {
        "request_type": CONTEXT_ONLY,
        "ctx_request_id": handle.ctx_request_id,
        "opaque_state": handle.opaque_state,
        "first_gen_tokens": list(first_token_ids),
    }
