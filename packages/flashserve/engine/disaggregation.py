"""Prefill/decode split on one replica: park a finished prompt's KV blocks, resume later.

A `context_only` request runs its prompt and samples the first token like any
other request; instead of freeing its KV blocks when it finishes, the engine
parks the sequence here under a handle (`ctx_request_id` plus a random
`opaque_state`, so handles cannot be guessed). A `generation_only` request
that presents the handle takes the parked sequence back and continues decoding
from its blocks. Parked entries expire after `ttl_s` and the table holds at
most `capacity` of them (the oldest goes first), so blocks nobody claims
are always returned to the cache.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence, TokenLogprob

CONTEXT_ONLY = "context_only"
GENERATION_ONLY = "generation_only"
DEFAULT_TTL_S = 60.0
DEFAULT_CAPACITY = 64


@dataclass(frozen=True)
class ContextHandle:
    ctx_request_id: int
    opaque_state: str


@dataclass(frozen=True)
class DisaggregatedRequest:
    """What a request asks of the split: run only its context, or only its generation."""

    request_type: str  # CONTEXT_ONLY | GENERATION_ONLY
    handle: ContextHandle | None = None  # generation_only: the context to resume


@dataclass
class ParkedContext:
    seq: Sequence
    handle: ContextHandle
    expires_at: float
    # The first token's logprob entry, when the context request computed one.
    first_logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # set when the first token already ended the request
    stop_reason: int | str | None = None


class UnknownContextError(ValueError):
    """No parked context matches the handle (never issued, claimed already, or expired)."""


class ContextTable:
    """Parked context_only sequences, keyed by ctx_request_id; safe to query from any thread."""

    def __init__(
        self,
        release: Callable[[Sequence], None],
        ttl_s: float = DEFAULT_TTL_S,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._release = release  # hands a parked sequence's blocks back to the block manager
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[int, ParkedContext] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def park(
        self,
        seq: Sequence,
        first_logprob: TokenLogprob | None = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
    ) -> ContextHandle:
        handle = ContextHandle(next(self._ids), secrets.token_urlsafe(16))
        entry = ParkedContext(
            seq,
            handle,
            self._clock() + self.ttl_s,
            first_logprob=first_logprob,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )
        with self._lock:
            self._entries[handle.ctx_request_id] = entry
            evicted = []
            while len(self._entries) > self.capacity:
                evicted.append(self._entries.popitem(last=False)[1])
        for old in evicted:
            self._release(old.seq)
        return handle

    def contains(self, handle: ContextHandle) -> bool:
        """Whether claim(handle) would succeed now (the API's early 400 check)."""
        with self._lock:
            entry = self._entries.get(handle.ctx_request_id)
            return entry is not None and self._valid(entry, handle)

    def claim(self, handle: ContextHandle, prompt_token_ids: list[int]) -> ParkedContext:
        """Take a parked context out of the table; its blocks now belong to the caller.

        The prompt must be the context's own: its KV blocks hold nothing else.
        A mismatch leaves the entry parked for the right request.
        """
        with self._lock:
            entry = self._entries.get(handle.ctx_request_id)
            if entry is None or not self._valid(entry, handle):
                raise UnknownContextError(
                    f"disaggregated_params: no context {handle.ctx_request_id} with that "
                    "opaque_state is parked on this replica (unknown, already used, or expired)"
                )
            if entry.seq.prompt_token_ids != list(prompt_token_ids):
                raise ValueError(
                    "disaggregated_params: this generation_only request's prompt differs from "
                    f"the prompt of context {handle.ctx_request_id}; send the same messages"
                )
            del self._entries[handle.ctx_request_id]
        return entry

    def evict_oldest(self) -> bool:
        """Release the oldest parked context (the KV cache needs its blocks); False if none."""
        with self._lock:
            if not self._entries:
                return False
            entry = self._entries.popitem(last=False)[1]
        self._release(entry.seq)
        return True

    def expire(self) -> int:
        """Release every entry past its deadline; returns how many went."""
        now = self._clock()
        with self._lock:
            gone = [e for e in self._entries.values() if e.expires_at <= now]
            for entry in gone:
                del self._entries[entry.handle.ctx_request_id]
        for entry in gone:
            self._release(entry.seq)
        return len(gone)

    def _valid(self, entry: ParkedContext, handle: ContextHandle) -> bool:
        return (
            secrets.compare_digest(entry.handle.opaque_state.encode(), handle.opaque_state.encode())
            and entry.expires_at > self._clock()
        )


def resumed_sequence(
    entry: ParkedContext, request_id: str, params: SamplingParams, device: torch.device
) -> Sequence:
    """The generation_only request's sequence: the parked one's tokens and blocks, its own settings.

    The context's first token is already an output token, so it counts
    towards max_tokens, min_tokens and the penalties exactly as in one
    ordinary request. A request with the context's seed continues the
    context's random stream, so the pair samples what one request would.
    """
    parked = entry.seq
    seq = Sequence(
        request_id,
        parked.prompt_token_ids,
        params,
        token_ids=list(parked.token_ids),
        num_computed_tokens=parked.num_computed_tokens,
        block_ids=parked.block_ids,
        block_hashes=parked.block_hashes,
        # Every prompt token was computed by the context phase, none here.
        num_cached_tokens=parked.num_prompt_tokens,
    )
    if params.seed is not None:
        if params.seed == parked.params.seed and parked.generator is not None:
            seq.generator = parked.generator
        else:
            seq.generator = torch.Generator(device).manual_seed(params.seed)
    return seq
