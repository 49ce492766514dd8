"""A request inside the engine: its tokens, its KV blocks and where it stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from flashserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from flashserve.engine.disaggregation import ContextHandle


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first


@dataclass
class SequenceOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    # context_only requests: the handle a generation_only request resumes with.
    context_handle: ContextHandle | None = None

    def absorb(self, later: SequenceOutput) -> None:
        """Append a later output of the same request, so the two travel as one."""
        self.new_token_ids = self.new_token_ids + later.new_token_ids
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finished = later.finished
        self.finish_reason = later.finish_reason
        self.stop_reason = later.stop_reason
        self.num_cached_tokens = later.num_cached_tokens
        self.error = later.error
        self.context_handle = later.context_handle or self.context_handle

    def one_token_each(self) -> list[SequenceOutput]:
        """This output as one output per token (the last keeps the finish): absorb undone."""
        ids = self.new_token_ids
        if len(ids) <= 1:
            return [self]
        last = len(ids) - 1
        return [
            replace(
                self,
                new_token_ids=[token],
                logprobs=[self.logprobs[i]] if self.logprobs else self.logprobs,
                finished=self.finished and i == last,
                finish_reason=self.finish_reason if i == last else None,
                stop_reason=self.stop_reason if i == last else None,
                context_handle=self.context_handle if i == last else None,
            )
            for i, token in enumerate(ids)
        ]


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Prefix-cache hashes of this sequence's full blocks, in order.
    block_hashes: list[int] = field(default_factory=list)
    # Leading blocks of block_ids whose hashes are published (BlockManager.register_full_blocks
    # starts after them; release resets it).
    num_published_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_tokens: int = 0
    generator: torch.Generator | None = None
    grammar_matcher: object | None = None
    # Speculative tokens to verify this step after the last token (engine/speculative/);
    # never part of token_ids until accepted.
    draft_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
