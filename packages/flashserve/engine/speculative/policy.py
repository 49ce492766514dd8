"""When a draft is worth verifying: a measured step-cost model and acceptance rates.

Verifying d draft tokens costs what computing d more tokens in the step costs, and
earns the draft tokens that get accepted. Both are measured as the engine runs:

* Step cost: the seconds of recent decode steps (pure decodes and verifications, no
  prefill chunks) against the tokens they computed, fitted as fixed + per_token *
  tokens by exponentially weighted least squares, one fit per batch-size bucket
  (1, 2-3, 4-7, 8-15, ... sequences). A step's cost is not linear over all sizes
  (flat while reading the weights dominates, then growing with the tokens), so each
  bucket's fit covers the sizes it decides for: from its plain decodes to its
  verifications of several tokens a sequence. A bucket without a fit speculates,
  which is also how it gets one.
* Acceptance: the share of a sequence's draft tokens accepted (with a prior from
  every sequence's), so a sequence whose text does not repeat stops drafting.

A step's drafts are then taken best first (expected accepted tokens per draft token)
while each raises the step's expected tokens per second. With a large batch the step
already turns out ~1 / per_token tokens per second, which no draft (earning fewer
tokens than it costs) can beat: speculation turns itself off.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from flashserve.engine.sequence import Sequence

# Weight of older observations per new one (an effective memory of ~50 steps).
COST_DECAY = 0.98
# Observed decode steps before the cost model decides (until then: speculate).
MIN_COST_SAMPLES = 8
# Pseudo-draft-tokens of the global acceptance rate in a sequence's own estimate.
PRIOR_WEIGHT = 4.0
# A sequence's own record fades by this factor on each step it does not draft, so
# its estimate drifts back to the global rate and it gets to try again.
IDLE_FADE = 0.97
# A draft is verified only if it is expected to gain at least this share of a token.
MIN_EXPECTED_GAIN = 0.05


@dataclass
class StepCostModel:
    """seconds ~= fixed + per_token * tokens over recent decode steps."""

    weight: float = 0.0
    sum_t: float = 0.0
    sum_s: float = 0.0
    sum_tt: float = 0.0
    sum_ts: float = 0.0
    samples: int = 0

    def observe(self, tokens: int, seconds: float) -> None:
        d = COST_DECAY
        self.weight = self.weight * d + 1.0
        self.sum_t = self.sum_t * d + tokens
        self.sum_s = self.sum_s * d + seconds
        self.sum_tt = self.sum_tt * d + tokens * tokens
        self.sum_ts = self.sum_ts * d + tokens * seconds
        self.samples += 1

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_token) seconds, or None before enough varied steps were seen."""
        if self.samples < MIN_COST_SAMPLES or self.weight <= 0:
            return None
        mean_t = self.sum_t / self.weight
        mean_s = self.sum_s / self.weight
        var_t = self.sum_tt / self.weight - mean_t * mean_t
        if var_t < 1e-6 * max(1.0, mean_t * mean_t):
            # Every recent step computed as many tokens: the split is unknown, and only
            # a step with drafts can tell it. Such a step costs at most its drafts.
            return None
        per_token = (self.sum_ts / self.weight - mean_t * mean_s) / var_t
        per_token = max(per_token, 0.0)
        fixed = max(mean_s - per_token * mean_t, 0.0)
        return fixed, per_token


@dataclass
class _Record:
    proposed: float = 0.0
    accepted: float = 0.0


def batch_bucket(num_sequences: int) -> int:
    """The cost model's bucket of a decode batch: 1, 2-3, 4-7, 8-15, ... sequences."""
    return max(1, num_sequences).bit_length()


class SpeculationPolicy:
    def __init__(self, always: bool = False) -> None:
        self.always = always  # verify every draft, whatever it is expected to earn
        self.costs: dict[int, StepCostModel] = {}
        self.global_proposed = 0.0
        self.global_accepted = 0.0
        self._records: weakref.WeakKeyDictionary[Sequence, _Record] = weakref.WeakKeyDictionary()

    @property
    def global_rate(self) -> float:
        # Optimistic until measured: drafts must be tried to learn anything.
        return (self.global_accepted + 1.0) / (self.global_proposed + 1.5)

    def acceptance_rate(self, seq: Sequence) -> float:
        record = self._records.get(seq)
        prior = self.global_rate
        if record is None:
            return prior
        return (record.accepted + PRIOR_WEIGHT * prior) / (record.proposed + PRIOR_WEIGHT)

    def expected_accepted(self, seq: Sequence, draft_len: int) -> float:
        """Expected accepted tokens of a draft: each next one needs all before it."""
        rate = min(self.acceptance_rate(seq), 0.999)
        return rate * (1.0 - rate**draft_len) / (1.0 - rate)

    def choose(
        self, num_decode_tokens: int, drafts: dict[Sequence, list[int]]
    ) -> dict[Sequence, list[int]]:
        """The drafts worth verifying in a step that computes num_decode_tokens without them."""
        if self.always:
            return dict(drafts)
        fit = self.cost_fit(num_decode_tokens)
        candidates = []
        for seq, draft in drafts.items():
            gain = self.expected_accepted(seq, len(draft))
            if gain >= MIN_EXPECTED_GAIN:
                candidates.append((gain / len(draft), gain, seq, draft))
        if fit is None:
            return {seq: draft for _, _, seq, draft in candidates}
        fixed, per_token = fit
        candidates.sort(key=lambda c: c[0], reverse=True)
        tokens = float(max(num_decode_tokens, 1))
        seconds = fixed + per_token * num_decode_tokens
        chosen: dict[Sequence, list[int]] = {}
        for _, gain, seq, draft in candidates:
            more_seconds = seconds + per_token * len(draft)
            # (tokens + gain) / more_seconds > tokens / seconds, without dividing by ~0.
            if (tokens + gain) * seconds > tokens * more_seconds:
                chosen[seq] = draft
                tokens += gain
                seconds = more_seconds
        return chosen

    def observe(self, num_sequences: int, tokens: int, seconds: float) -> None:
        """A decode step of num_sequences sequences computed `tokens` in `seconds`."""
        bucket = batch_bucket(num_sequences)
        model = self.costs.get(bucket)
        if model is None:
            model = self.costs[bucket] = StepCostModel()
        model.observe(tokens, seconds)

    def cost_fit(self, num_sequences: int) -> tuple[float, float] | None:
        model = self.costs.get(batch_bucket(num_sequences))
        return model.fit() if model is not None else None

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        entry = self._records.get(seq)
        if entry is None:
            entry = self._records[seq] = _Record()
        entry.proposed += proposed
        entry.accepted += accepted
        self.global_proposed = self.global_proposed * COST_DECAY + proposed
        self.global_accepted = self.global_accepted * COST_DECAY + accepted

    def idle(self, seq: Sequence) -> None:
        entry = self._records.get(seq)
        if entry is not None:
            entry.proposed *= IDLE_FADE
            entry.accepted *= IDLE_FADE
