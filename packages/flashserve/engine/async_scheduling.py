"""Async scheduling: step n+1 is scheduled and launched before step n's tokens reach the host.

With it on, `LLMEngine.step` schedules and launches the next step first, then brings the
previous step's tokens to the host and does their output work (stop checks, outputs)
while the device runs the step just launched. Every sequence sampled by the previous
step holds a placeholder, PENDING_TOKEN, as its last token until then: the scheduler,
the block manager and the runner count it as a known token, and the runner feeds the
previous draws to the model on the device (`ModelRunner.launch`), so no token makes a
round trip through the host between two steps.

What needs the token itself before the next step is prepared makes the step wait (the
previous step is finished before scheduling, as without overlap):
- a grammar (its next mask depends on the token), penalties and bad sequences (they read
  the output tokens), and speculative decoding (drafts continue the last tokens);
- a sequence certain to end with its pending token (max_tokens, the context, a
  context_only request's single token) is not scheduled again: nothing to wait for.
A sequence that ends on a token only known later (EOS, a stop token) has computed one
step past it; that draw is dropped, and its blocks were released when it finished.

On a CPU, where torch runs each op to completion, a launch is the whole step, so the
overlap only delays every output by a step: `async_scheduling: auto` turns it on for
CUDA only (bench/RESULTS.md, issue 17 second pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flashserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from flashserve.engine.model_runner import LaunchedStep

# The stand-in for a drawn token that is still on the device. Negative: it can never be
# a real id, and an embedding lookup of it fails loudly rather than reading a wrong row.
PENDING_TOKEN = -1


def overlap_enabled(setting: bool | str, device: torch.device) -> bool:
    """The `async_scheduling` setting: true, false, or "auto" (CUDA only)."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"async_scheduling must be true, false or 'auto', got {setting!r}")


def needs_token_before_next_step(seq: Sequence) -> bool:
    """Whether preparing seq's next step reads its last drawn token on the host."""
    p = seq.params
    return (
        seq.grammar_matcher is not None
        or bool(p.bad_sequences)
        or p.repetition_penalty != 1.0
        or bool(p.frequency_penalty)
        or bool(p.presence_penalty)
    )


def ends_with_pending_token(seq: Sequence, max_model_len: int, context_only: bool) -> bool:
    """Whether seq's pending token surely ends it, whatever its value."""
    return (
        context_only
        or seq.num_output_tokens >= seq.params.max_tokens
        or seq.num_tokens >= max_model_len
    )


@dataclass
class StepInFlight:
    """A launched step whose draws have not been brought to the host yet."""

    launched: LaunchedStep
    # Each sampled sequence's index of its PENDING_TOKEN in token_ids, in sampled order.
    pending_index: list[int]
    decode_only: bool
    items: list[tuple[Sequence, int]]
    started: float  # time.perf_counter() at launch
