"""Batched token selection: one pass over the whole batch's logits per stage.

Per-request settings become [B] tensors; no stage loops over the vocabulary in
Python. Stages run only when some request in the batch asks for them.

Order: logits processors (engine/logits_processors.py: penalties, bias, bans,
grammar masks) -> temperature -> logprobs (taken here: the distribution the
request samples from, before truncation) -> top-k / top-p / min-p truncation
-> draw.

Draw: greedy rows take the argmax. Sampled rows use the exponential race
(argmax of p / E with E ~ Exp(1)), which picks token i with probability p_i.
Requests with a seed draw E from their own generator, so their tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.engine.logits_processors import apply_logits_processors
from flashserve.engine.sequence import Sequence, TokenLogprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(
        self, device: torch.device, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits[:, : self.vocab_size].float()
        logits = apply_logits_processors(logits, seqs, self.eos_token_ids)
        params = [s.params for s in seqs]
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        temps = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params], device=self.device
        )
        if any(p.temperature not in (0.0, 1.0) for p in params):
            logits = logits / temps[:, None]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs]
        full_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        if bool(greedy.all()):
            chosen = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(_truncate(logits, params, self.device), dim=-1)
            noise = torch.empty_like(probs).exponential_()
            for i, seq in enumerate(seqs):
                if seq.generator is not None and not params[i].greedy:
                    noise[i].exponential_(generator=seq.generator)
            sampled = (probs / noise).argmax(dim=-1)
            chosen = torch.where(greedy, logits.argmax(dim=-1), sampled)

        token_ids = chosen.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if full_logprobs is not None:
            for row, i in enumerate(logprob_rows):
                logprobs[i] = _token_logprob(
                    full_logprobs[row], token_ids[i], params[i].top_logprobs
                )
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def _truncate(logits: torch.Tensor, params, device) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets."""
    vocab = logits.shape[-1]
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [_effective_top_p(p) for p in params]
    min_p = [p.min_p for p in params]
    if all(k >= vocab for k in top_k) and all(tp >= 1.0 for tp in top_p) and not any(min_p):
        return logits
    if any(mp > 0 for mp in min_p):
        probs = torch.softmax(logits, dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_p, device=device)[:, None]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if all(k >= vocab for k in top_k) and all(tp >= 1.0 for tp in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    drop = ranks >= torch.tensor(top_k, device=device)[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that
    # crosses the threshold stays in).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _effective_top_p(p) -> float:
    # top_p_min is the floor of a dynamic top-p; without a decay schedule in
    # the request the nucleus is simply max(top_p, top_p_min).
    return max(p.top_p, p.top_p_min) if p.top_p_min else p.top_p


def _token_logprob(row: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_n:
        values, ids = row.topk(top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(row[token_id]), top=top)
