"""Per-request edits of the next-token logits, applied batch-wide.

Every processor takes the whole step's logits [B, V] and edits only the rows
of the requests that ask for it, with a fixed number of tensor operations
whatever B is: per-row settings become small tensors, token lists become one
flat (row, token) index built once per step, and the edit is one gather /
scatter / index_put over all those rows. Nothing loops over the vocabulary in
Python, and a processor nobody in the batch needs costs nothing.

Order (LOGITS_PROCESSORS), on the model's raw logits:

1. repetition_penalty: multiplicative, over prompt and output tokens; a seen
   token's logit is divided by the penalty when positive, multiplied when not.
2. frequency_penalty / presence_penalty: additive, over output tokens:
   logit -= frequency * count + presence * (count > 0).
3. logit_bias: added as given.
4. bans: -inf for min_tokens (EOS and stop tokens until min_tokens are out),
   bad_token_ids, and the last token of every bad sequence whose other tokens
   end the output so far. Bans come after the bias so nothing can undo them.

Masks that must also win over the bias (structured-output grammars) belong
after the bans; add them to the list, which the sampler runs in order.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from itertools import chain

import torch

from flashserve.engine.host_transfer import upload
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from flashserve.engine.structured import apply_grammar_bitmask

LogitsProcessor = Callable[[torch.Tensor, "LogitsBatch"], torch.Tensor]

# The distinct prompt tokens of each live sequence, on the device: a long
# prompt is turned into a tensor once, not on every decode step.
_PROMPT_TOKENS: weakref.WeakKeyDictionary[Sequence, torch.Tensor] = weakref.WeakKeyDictionary()


class LogitsBatch:
    """What the processors read about one step's batch."""

    def __init__(
        self, seqs: list[Sequence], eos_token_ids: tuple[int, ...], device: torch.device
    ) -> None:
        self.seqs = seqs
        self.params = [s.params for s in seqs]
        self.eos_token_ids = eos_token_ids
        self.device = device

    def rows(self, wants: Callable[[SamplingParams], bool]) -> list[int]:
        return [i for i, p in enumerate(self.params) if wants(p)]

    def tensor(self, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return upload(values, dtype, self.device)


# Which rows each processor edits: the processors and edits_logits both ask these.
def _penalizes_repetition(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0


def _penalizes_frequency(p: SamplingParams) -> bool:
    return bool(p.frequency_penalty or p.presence_penalty)


def _may_ban(seq: Sequence) -> bool:
    """Whether banned_tokens can name any token for seq (cheap; a superset)."""
    p = seq.params
    return bool(
        p.bad_token_ids
        or p.bad_sequences
        or (p.min_tokens and seq.num_output_tokens < p.min_tokens)
    )


def apply_repetition_penalty(logits: torch.Tensor, batch: LogitsBatch) -> torch.Tensor:
    rows = batch.rows(_penalizes_repetition)
    if not rows:
        return logits
    seqs = [batch.seqs[i] for i in rows]
    prompts = _prompt_tokens(seqs, batch.device)
    outputs = [s.token_ids[s.num_prompt_tokens :] for s in seqs]
    index_rows, index_ids = _flat_index(
        batch,
        [p.shape[0] for p in prompts] + [len(o) for o in outputs],
        torch.cat(prompts),
        outputs,
    )
    row_ids = batch.tensor(rows, torch.long)
    sub = logits.index_select(0, row_ids)
    seen = torch.zeros_like(sub, dtype=torch.bool)
    seen.index_put_((index_rows, index_ids), torch.ones((), dtype=torch.bool, device=sub.device))
    penalty = batch.tensor([batch.params[i].repetition_penalty for i in rows])[:, None]
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    return logits.index_copy_(0, row_ids, torch.where(seen, penalized, sub))


def apply_frequency_presence_penalties(logits: torch.Tensor, batch: LogitsBatch) -> torch.Tensor:
    rows = batch.rows(_penalizes_frequency)
    if not rows:
        return logits
    seqs = [batch.seqs[i] for i in rows]
    outputs = [s.token_ids[s.num_prompt_tokens :] for s in seqs]
    index_rows, index_ids = _flat_index(batch, [len(o) for o in outputs], None, outputs)
    row_ids = batch.tensor(rows, torch.long)
    sub = logits.index_select(0, row_ids)
    counts = torch.zeros_like(sub)
    counts.index_put_((index_rows, index_ids), torch.ones((), device=sub.device), accumulate=True)
    frequency = batch.tensor([batch.params[i].frequency_penalty for i in rows])[:, None]
    presence = batch.tensor([batch.params[i].presence_penalty for i in rows])[:, None]
    sub = sub - frequency * counts - presence * (counts > 0).to(sub.dtype)
    return logits.index_copy_(0, row_ids, sub)


def apply_logit_bias(logits: torch.Tensor, batch: LogitsBatch) -> torch.Tensor:
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, p in enumerate(batch.params):
        if p.logit_bias:
            rows.extend([i] * len(p.logit_bias))
            ids.extend(p.logit_bias.keys())
            values.extend(p.logit_bias.values())
    if not rows:
        return logits
    index = (batch.tensor(rows, torch.long), batch.tensor(ids, torch.long))
    return logits.index_put_(index, batch.tensor(values, logits.dtype), accumulate=True)


def apply_bans(logits: torch.Tensor, batch: LogitsBatch) -> torch.Tensor:
    rows: list[int] = []
    ids: list[int] = []
    for i, seq in enumerate(batch.seqs):
        banned = banned_tokens(seq, batch.eos_token_ids)
        rows.extend([i] * len(banned))
        ids.extend(banned)
    if not rows:
        return logits
    index = (batch.tensor(rows, torch.long), batch.tensor(ids, torch.long))
    return logits.index_put_(index, logits.new_full((), float("-inf")))


LOGITS_PROCESSORS: list[LogitsProcessor] = [
    apply_repetition_penalty,
    apply_frequency_presence_penalties,
    apply_logit_bias,
    apply_bans,
    apply_grammar_bitmask,  # last: the output's structure wins over every other edit
]


def edits_logits(seq: Sequence) -> bool:
    """Whether any of LOGITS_PROCESSORS may edit seq's row this step (False: it surely
    leaves the row as the model gave it; True may still edit nothing, e.g. a bad sequence
    that does not match). The sampler reads raw logits where no row needs editing."""
    p = seq.params
    return (
        _penalizes_repetition(p)
        or _penalizes_frequency(p)
        or bool(p.logit_bias)
        or _may_ban(seq)
        or seq.grammar_matcher is not None
    )


def apply_logits_processors(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]
) -> torch.Tensor:
    batch = LogitsBatch(seqs, eos_token_ids, logits.device)
    for processor in LOGITS_PROCESSORS:
        logits = processor(logits, batch)
    return logits


def banned_tokens(seq: Sequence, eos_token_ids: tuple[int, ...]) -> list[int]:
    """Token ids seq may not produce next (may repeat; Python work per row, not per token)."""
    if not _may_ban(seq):
        return []
    p = seq.params
    banned = list(p.bad_token_ids)
    if p.min_tokens and seq.num_output_tokens < p.min_tokens:
        banned.extend(p.stop_token_ids)
        if not p.ignore_eos:
            banned.extend(eos_token_ids)
    if p.bad_sequences:
        produced = seq.num_output_tokens
        tokens = seq.token_ids
        for bad in p.bad_sequences:
            k = len(bad) - 1
            # A one-token sequence (k == 0) is banned outright.
            if k <= produced and (k == 0 or tokens[-k:] == list(bad[:-1])):
                banned.append(bad[-1])
    return banned


def _prompt_tokens(seqs: list[Sequence], device: torch.device) -> list[torch.Tensor]:
    """Each sequence's distinct prompt tokens; new sequences' made in one transfer."""
    new = [s for s in seqs if s not in _PROMPT_TOKENS]
    if new:
        distinct = [sorted(set(s.prompt_token_ids)) for s in new]
        flat = upload(list(chain.from_iterable(distinct)), torch.long, device)
        for seq, ids in zip(new, flat.split([len(d) for d in distinct])):
            _PROMPT_TOKENS[seq] = ids
    return [_PROMPT_TOKENS[s] for s in seqs]


def _flat_index(
    batch: LogitsBatch,
    lengths: list[int],
    leading: torch.Tensor | None,
    lists: Iterable[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index of every listed token, rows numbered 0..r-1 within the sub-batch.

    `lengths` gives the token count of each group, in order: with `leading`,
    first r groups already on the device (one per row), then r Python lists;
    without it, r Python lists.
    """
    tail = batch.tensor(list(chain.from_iterable(lists)), torch.long)
    ids = tail if leading is None else torch.cat([leading, tail])
    groups = len(lengths) if leading is None else len(lengths) // 2
    group_rows = torch.arange(groups, device=batch.device)
    if leading is not None:
        group_rows = group_rows.repeat(2)
    # output_size: no device sync to learn the result's length.
    rows = torch.repeat_interleave(
        group_rows, batch.tensor(lengths, torch.long), output_size=sum(lengths)
    )
    return rows, ids
