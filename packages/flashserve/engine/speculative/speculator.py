"""The engine's side of speculative decoding: drafts before a step, bookkeeping after.

Per step: `propose` gives each running sequence that is about to decode an n-gram
draft (within its max_tokens and the context), keeps the drafts the policy finds worth
verifying this step, cuts each at the first token its grammar refuses and keeps the
grammar masks of its positions; the scheduler then gives a drafted sequence 1 + d
tokens; `verify_step` runs the step and decides the emitted tokens; `record` updates
the acceptance rates, the step-cost model and the counters the metrics read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flashserve.config import EngineConfig
from flashserve.engine.disaggregation import CONTEXT_ONLY
from flashserve.engine.sequence import Sequence
from flashserve.engine.speculative.policy import SpeculationPolicy
from flashserve.engine.speculative.proposer import NgramProposer
from flashserve.engine.speculative.verify import Emission, check_draft_against_grammar

logger = logging.getLogger(__name__)


@dataclass
class SpeculationStats:
    """Counters since start (what /metrics shows)."""

    steps_speculated: int = 0  # steps that verified at least one draft
    steps_declined: int = 0  # steps with drafts that the cost rule turned down
    drafts: int = 0  # drafts verified
    draft_tokens: int = 0  # draft tokens verified (proposals)
    accepted_tokens: int = 0  # draft tokens accepted
    emitted_tokens: int = 0  # tokens drafted sequences emitted (accepted + one each)
    last_step_accepted: int = 0
    # The cost model's current fit (seconds), 0 until it has one.
    step_fixed_seconds: float = 0.0
    step_per_token_seconds: float = 0.0


class Speculator:
    def __init__(self, config: EngineConfig, vocab_size: int, max_model_len: int) -> None:
        self.k = int(config.num_speculative_tokens)
        self.proposer = NgramProposer(int(config.ngram_min), int(config.ngram_max), self.k)
        self.policy = SpeculationPolicy(always=config.speculative_policy == "always")
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.stats = SpeculationStats()
        # Grammar masks of this step's drafted positions, by sequence.
        self.masks: dict[Sequence, torch.Tensor] = {}
        self._declining = False

    def propose(self, running: list[Sequence]) -> None:
        """Set draft_token_ids on the running sequences worth speculating for this step."""
        self.masks.clear()
        candidates: dict[Sequence, list[int]] = {}
        decoding = 0
        for seq in running:
            seq.draft_token_ids.clear()
            if seq.num_uncomputed_tokens != 1:
                continue
            decoding += 1
            disaggregated = seq.params.disaggregated
            if disaggregated is not None and disaggregated.request_type == CONTEXT_ONLY:
                continue  # it ends with its first token
            room = min(
                seq.params.max_tokens - seq.num_output_tokens - 1,
                self.max_model_len - seq.num_tokens,
            )
            draft = self.proposer.propose(seq, room)
            if draft:
                candidates[seq] = draft
            else:
                self.policy.idle(seq)
        if not candidates:
            return
        chosen = self.policy.choose(decoding, candidates)
        for seq in candidates.keys() - chosen.keys():
            self.policy.idle(seq)
        declining = not chosen
        if declining:
            self.stats.steps_declined += 1
        if declining != self._declining:
            self._declining = declining
            fit = self.policy.cost_fit(decoding)
            logger.info(
                "speculation %s at %d decoding sequences (step cost %s)",
                "off" if declining else "on",
                decoding,
                "not fitted"
                if fit is None
                else f"{fit[0] * 1e3:.2f} ms + {fit[1] * 1e3:.3f} ms/token",
            )
        for seq, draft in chosen.items():
            draft, masks = check_draft_against_grammar(seq, draft, self.vocab_size)
            if not draft:
                continue
            seq.draft_token_ids.extend(draft)
            if masks is not None:
                self.masks[seq] = masks

    def record(self, emissions: list[Emission]) -> None:
        stats = self.stats
        accepted = 0
        drafted = False
        for e in emissions:
            if not e.draft_len:
                continue
            drafted = True
            self.policy.record(e.seq, e.draft_len, e.accepted)
            stats.drafts += 1
            stats.draft_tokens += e.draft_len
            stats.accepted_tokens += e.accepted
            stats.emitted_tokens += e.accepted + 1
            accepted += e.accepted
        if drafted:
            stats.steps_speculated += 1
            stats.last_step_accepted = accepted

    def observe_step(self, num_sequences: int, tokens: int, seconds: float) -> None:
        """A decode step's cost (no prefill chunk in it), for the cost model."""
        self.policy.observe(num_sequences, tokens, seconds)
        fit = self.policy.cost_fit(num_sequences)
        if fit is not None:  # the metrics show the fit of the latest step's batch size
            self.stats.step_fixed_seconds, self.stats.step_per_token_seconds = fit

    def forget(self, seq: Sequence) -> None:
        self.masks.pop(seq, None)
        self.proposer.forget(seq)
