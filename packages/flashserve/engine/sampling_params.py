"""Everything that decides how one request's tokens are chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flashserve.engine.disaggregation import DisaggregatedRequest


@dataclass
class SamplingParams:
    max_tokens: int = 4096
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0
    top_p_min: float = 0.0  # floor of the dynamic top-p (see engine/sampler.py)
    # Per-token decay of the dynamic top-p: top_p_t = max(top_p_min, top_p * decay**t).
    top_p_decay: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    bad_token_ids: tuple[int, ...] = ()
    # Token sequences never to complete (from `bad`); the last token is banned
    # whenever the output so far ends with the others.
    bad_sequences: tuple[tuple[int, ...], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # A structured-output matcher factory (engine/structured.py); None: unconstrained.
    grammar: Any = None
    # Prefill/decode split (engine/disaggregation.py); None: an ordinary request.
    disaggregated: DisaggregatedRequest | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(
            self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
        )
