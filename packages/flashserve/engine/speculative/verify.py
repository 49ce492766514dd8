"""Verification of drafts: every position sampled with the history it would have had.

A drafted sequence computes its last token and its d draft tokens in one forward pass
(the scheduler gives it 1 + d tokens of the step's budget and KV slots), which yields
the next-token logits of d + 1 positions. Position j is sampled exactly as an ordinary
decode of the sequence extended by the first j draft tokens would be: the sampler
sees a `PositionView` with that history (penalties, bad sequences, min_tokens, dynamic
top-p count), the grammar mask of the matcher advanced over those tokens, the same
temperature and truncation. The draft is accepted while each position's draw equals
the draft token; the first draw that differs, or the draw after a fully accepted
draft, is the one more token the step emits.

Why that is exact for sampled requests: the draft is deterministic, so rejection
sampling accepts draft token x with probability p(x) and, on rejection, draws from p
with x removed and renormalised. A draw y ~ p compared with x does both at once: y = x
with probability p(x), and given y != x, y is distributed as p without x. Greedy
requests draw the argmax, so they accept exactly while the draft is what greedy
decoding would write, and emit what it would write next.

Seeded requests: their positions are sampled one after another, each from the
request's own generator, stopping at the first mismatch, so the generator gives each
emitted token the draws an ordinary decode would have given it. A seeded request's
tokens are therefore the ones it gets without speculation (given the same logits),
and they do not depend on whether a step speculated. Unseeded rows of every position
are sampled in one batch; their draws for positions past a rejection are discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashserve.engine.sequence import Sequence, TokenLogprob


class PositionView:
    """A sequence as the sampler would see it `len(extra)` draft tokens later."""

    __slots__ = (
        "request_id",
        "params",
        "prompt_token_ids",
        "token_ids",
        "generator",
        "grammar_matcher",
        "grammar_bitmask",
        "__weakref__",
    )

    def __init__(
        self, seq: Sequence, extra: list[int], grammar_bitmask: torch.Tensor | None
    ) -> None:
        self.request_id = seq.request_id
        self.params = seq.params
        self.prompt_token_ids = seq.prompt_token_ids
        self.token_ids = seq.token_ids + extra if extra else seq.token_ids
        self.generator = seq.generator
        self.grammar_matcher = seq.grammar_matcher
        # The grammar's mask for this position, filled when the draft was checked
        # (the matcher itself stands at position 0); None: unconstrained.
        self.grammar_bitmask = grammar_bitmask

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)


@dataclass
class Emission:
    """The tokens one step emits for one sequence, in order, with their logprobs."""

    seq: Sequence
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    draft_len: int = 0  # draft tokens verified this step
    accepted: int = 0  # of which accepted


def check_draft_against_grammar(
    seq: Sequence, draft: list[int], vocab: int
) -> tuple[list[int], torch.Tensor | None]:
    """The longest prefix of `draft` the grammar accepts, and the masks of its positions.

    Returns (draft prefix, bitmask rows [len(prefix) + 1, words]) for a constrained
    sequence, (draft, None) otherwise. A token the grammar (or its always-banned set)
    refuses ends the draft there; so does a token that completes the grammar, after
    which no position follows. The matcher is rolled back to where it was.
    """
    matcher = seq.grammar_matcher
    if matcher is None or not draft:
        return draft, None
    import xgrammar as xgr

    allowed = seq.params.grammar.allowed
    masks = xgr.allocate_token_bitmask(len(draft) + 1, vocab)
    advanced = 0
    kept = len(draft)
    for j, token in enumerate(draft):
        matcher.fill_next_token_bitmask(masks, j)
        if not (_allows(masks[j], token) and (allowed is None or _allows(allowed, token))):
            kept = j
            break
        if not matcher.accept_token(token):
            kept = j
            break
        advanced += 1
        if matcher.is_terminated():
            kept = j
            break
    else:
        matcher.fill_next_token_bitmask(masks, len(draft))
    if advanced:
        matcher.rollback(advanced)
    return draft[:kept], masks[: kept + 1]


def _allows(row: torch.Tensor, token: int) -> bool:
    if token < 0 or token >= row.shape[0] * 32:
        return False
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


@torch.inference_mode()
def verify_step(
    runner, items: list[tuple[Sequence, int]], masks: dict[Sequence, torch.Tensor]
) -> list[Emission]:
    """Run the step (drafts included) and decide what each sampled sequence emits."""
    hidden, sample_rows, sampled = runner.forward(items)
    if not sampled:
        return []
    logits = runner.logits(hidden, sample_rows)
    emissions: list[Emission] = []
    views: list[Sequence | PositionView] = []
    # Per emission: its first row and its draft (empty for ordinary decodes/prefills).
    spans: list[tuple[Emission, int, list[int]]] = []
    row = 0
    while row < len(sampled):
        seq = sampled[row]
        count = 1
        while row + count < len(sampled) and sampled[row + count] is seq:
            count += 1
        draft = seq.draft_token_ids[: count - 1]
        emission = Emission(seq, draft_len=len(draft))
        emissions.append(emission)
        spans.append((emission, row, draft))
        if draft:
            seq_masks = masks.get(seq)
            for j in range(len(draft) + 1):
                mask = seq_masks[j] if seq_masks is not None else None
                views.append(PositionView(seq, draft[:j], mask))
        else:
            views.append(seq)
        row += len(draft) + 1
    # Rows drawn in the first batch: everything but the later positions of seeded drafts.
    first = []
    for emission, start, draft in spans:
        count = 1 if emission.seq.generator is not None and draft else len(draft) + 1
        first.extend(range(start, start + count))
    tokens: dict[int, int] = {}
    logprobs: dict[int, TokenLogprob | None] = {}
    _sample_rows(runner, logits, views, first, tokens, logprobs)
    seeded = [
        (e, start, draft) for e, start, draft in spans if draft and e.seq.generator is not None
    ]
    position = 1
    while seeded:
        # A seeded draft's next position is drawn only if every earlier one matched.
        seeded = [
            (e, start, draft)
            for e, start, draft in seeded
            if position <= len(draft) and tokens[start + position - 1] == draft[position - 1]
        ]
        if seeded:
            _sample_rows(
                runner, logits, views, [s + position for _, s, _ in seeded], tokens, logprobs
            )
        position += 1
    for emission, start, draft in spans:
        j = 0
        while j < len(draft) and tokens[start + j] == draft[j]:
            j += 1
        emission.accepted = j
        emission.token_ids = [tokens[start + i] for i in range(j + 1)]
        emission.logprobs = [logprobs[start + i] for i in range(j + 1)]
    return emissions


def _sample_rows(
    runner,
    logits: torch.Tensor,
    views: list,
    rows: list[int],
    tokens: dict[int, int],
    logprobs: dict[int, TokenLogprob | None],
) -> None:
    index = torch.tensor(rows, device=logits.device)
    result = runner.sampler(logits.index_select(0, index), [views[r] for r in rows])
    for r, token, logprob in zip(rows, result.token_ids, result.logprobs):
        tokens[r] = token
        logprobs[r] = logprob
