"""Batched token selection: one pass over the whole batch's logits per stage.

Per-request settings become [B] tensors; no stage loops over the vocabulary in
Python. Stages run only when some request in the batch asks for them.

Order: logits processors (engine/logits_processors.py: penalties, bias, bans,
grammar masks) -> temperature -> logprobs -> top-k / top-p / min-p
truncation -> draw.

Logprobs are the log-softmax of the logits after the processors and the
temperature (greedy requests: temperature 1), before truncation: the
distribution the request samples from, with every alternative still
comparable (truncation would turn most of them into -inf, which JSON cannot
carry). Banned tokens (-inf) never appear among the top alternatives.

Dynamic top-p (TensorRT-LLM's top_p_decay / top_p_min rule): the nucleus of a
request's t-th output token is max(top_p_min, top_p * top_p_decay**t). With
the default decay of 1 it is just max(top_p, top_p_min).

Draw: greedy rows take the argmax. Sampled rows use the exponential race
(argmax of p / E with E ~ Exp(1)), which picks token i with probability p_i:
rows with a small top-k over their k candidates, all others over the whole
vocabulary, their top-k / nucleus cut-off found by a radix select instead of a
sort (on the CPU; _draw_from_vocab). Requests with a seed draw E from their own
generator, and every stage leaves a row that does not ask for it bit-for-bit
unchanged, so a seeded request's tokens do not depend on what else is in the
batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.engine.logits_processors import apply_logits_processors
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence, TokenLogprob
from flashserve.engine.truncation import kept_probs, truncate_logits


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
        # A private fp32 copy: the processors edit it in place.
        logits = logits[:, : self.vocab_size].to(torch.float32, copy=True)
        logits = apply_logits_processors(logits, seqs, self.eos_token_ids)
        params = [s.params for s in seqs]
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        if any(p.temperature not in (0.0, 1.0) for p in params):
            temps = torch.tensor(
                [p.temperature if not p.greedy else 1.0 for p in params], device=self.device
            )
            logits = logits / temps[:, None]

        if bool(greedy.all()):
            chosen = logits.argmax(dim=-1)
        else:
            top_p = [effective_top_p(p, s.num_output_tokens) for p, s in zip(params, seqs)]
            chosen = _draw(logits, seqs, top_p, self.device)
            if any(p.greedy for p in params):  # else skip a pass over the vocabulary
                chosen = torch.where(greedy, logits.argmax(dim=-1), chosen)

        token_ids = chosen.tolist()
        return SamplerOutput(token_ids=token_ids, logprobs=_logprobs(logits, chosen, params))


def effective_top_p(p: SamplingParams, num_output_tokens: int) -> float:
    """The nucleus for a request's next token (see the module docstring)."""
    if not p.top_p_min and p.top_p_decay == 1.0:
        return p.top_p
    return max(p.top_p_min, p.top_p * p.top_p_decay**num_output_tokens)


# Rows with 0 < top_k <= this draw from their top_k candidates alone: a topk()
# over the vocabulary and noise for k tokens. All other sampled rows (a nucleus,
# min-p, a larger top-k, or none of them) take _draw_from_vocab: on the CPU a
# radix select for the cut-off, never a sort of the vocabulary. (A nucleus that
# fits within the top 1024 tokens used to take the candidates' path; the radix
# select costs less than finding that out, and covers any nucleus.)
CANDIDATE_TOP_K_LIMIT = 1024


def _draw(
    logits: torch.Tensor, seqs: list[Sequence], top_p: list[float], device: torch.device
) -> torch.Tensor:
    """One sampled token per row (greedy rows get one too; the caller ignores it).

    Which path a row takes depends only on its own settings, never on the rest of
    the batch, so a seeded request draws the same tokens in any batch.
    """
    limit = min(CANDIDATE_TOP_K_LIMIT, logits.shape[-1])
    small = [0 < s.params.top_k <= limit for s in seqs]
    ks = [s.params.top_k for s in seqs]
    for i, seq in enumerate(seqs):
        if seq.params.greedy:  # the caller takes the argmax: any cheap draw will do
            small[i], ks[i] = True, 1
    if all(small):
        return _draw_from_top_k(logits, seqs, top_p, ks, device)
    if not any(small):
        return _draw_from_vocab(logits, seqs, top_p, device)
    out = torch.empty(len(seqs), dtype=torch.long, device=device)
    for wanted in (True, False):
        rows = [i for i, s in enumerate(small) if s == wanted]
        index = torch.tensor(rows, device=device)
        picked = [seqs[i] for i in rows]
        row_top_p = [top_p[i] for i in rows]
        sub = logits.index_select(0, index)
        if wanted:
            row_ks = [ks[i] for i in rows]
            out[index] = _draw_from_top_k(sub, picked, row_top_p, row_ks, device)
        else:
            out[index] = _draw_from_vocab(sub, picked, row_top_p, device)
    return out


def _draw_from_vocab(
    logits: torch.Tensor, seqs: list[Sequence], top_p: list[float], device: torch.device
) -> torch.Tensor:
    """Truncate as truncate_logits does, without its sort, then the exponential race.

    On the CPU a sort of [B, V] is slow, and so is exponential_(): the truncation
    zeroes the dropped tokens' probabilities in place (kept_probs), and the race's
    noise E = -log U takes uniforms (a fraction of exponential_'s cost), drawn into
    the truncation's spent work buffer. Seeded rows draw U from their own generator.

    Not inverse-CDF sampling (one uniform a row, the token where the running sum of
    the probabilities passes it), though it costs less still: which token that
    picks moves with rounding anywhere before it in the vocabulary, and a model's
    logits for a request differ in their last bits with the batch around it (a
    GEMM's blocking follows the batch's size), so seeded requests would no longer
    reproduce their tokens in another batch. The race compares p / E token by
    token: a last-bit difference changes its winner only in a near-tie.
    """
    params = [s.params for s in seqs]
    if logits.device.type != "cpu":
        return _draw_by_sort(logits, seqs, top_p, device)
    probs, work = kept_probs(logits, params, top_p)
    noise = work.view(torch.float32).uniform_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None and not params[i].greedy:
            noise[i].uniform_(generator=seq.generator)
    # argmax of p / E, E = -log U ~ Exp(1), is the argmin of p / log U (log U < 0).
    # (U = 0, once in 2**24 draws, gives log U = -inf: that token loses.)
    return torch.div(probs, noise.log_(), out=noise).argmin(dim=-1)


def _draw_by_sort(
    logits: torch.Tensor, seqs: list[Sequence], top_p: list[float], device: torch.device
) -> torch.Tensor:
    """_draw_from_vocab on an accelerator: truncate_logits's sort, then the exponential race.

    There a sort costs little, and the radix select's histograms would be summed by
    atomic adds, in an order that varies from run to run (and with the batch).
    """
    params = [s.params for s in seqs]
    probs = torch.softmax(truncate_logits(logits, params, top_p, device), dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None and not params[i].greedy:
            noise[i].exponential_(generator=seq.generator)
    return (probs / noise).argmax(dim=-1)


def _draw_from_top_k(
    logits: torch.Tensor,
    seqs: list[Sequence],
    top_p: list[float],
    ks: list[int],
    device: torch.device,
) -> torch.Tensor:
    """The same truncation as truncate_logits (top-k, min-p, top-p), on each row's k best tokens."""
    params = [s.params for s in seqs]
    values, candidates = logits.topk(max(ks), dim=-1)  # sorted, best first
    ranks = torch.arange(values.shape[-1], device=device)[None, :]
    drop = ranks >= torch.tensor(ks, device=device)[:, None]
    # min-p keeps p >= min_p * p_max, i.e. logit - best_logit >= log(min_p).
    if any(p.min_p > 0 for p in params):
        log_min_p = torch.tensor([p.min_p for p in params], device=device).log()[:, None]
        drop |= values - values[:, :1] < log_min_p
    if any(tp < 1.0 for tp in top_p):
        probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
        nucleus = torch.tensor(top_p, device=device)[:, None]
        drop |= (probs.cumsum(dim=-1) - probs >= nucleus) & (nucleus < 1.0)
    drop[:, 0] = False
    # The exponential race needs weights proportional to p only: skip normalising.
    weights = (values - values[:, :1]).exp().masked_fill(drop, 0.0)
    noise = torch.empty_like(weights).exponential_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None and not params[i].greedy:
            # Exactly k draws from the request's own generator, whatever the batch's widest k.
            noise[i, : ks[i]].exponential_(generator=seq.generator)
    return candidates.gather(1, (weights / noise).argmax(dim=-1, keepdim=True)).squeeze(1)


def _logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprob | None]:
    """Logprob entries for the rows that asked, from one log-softmax and one top-k."""
    out: list[TokenLogprob | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return out
    row_ids = torch.tensor(rows, device=logits.device)
    table = torch.log_softmax(logits.index_select(0, row_ids), dim=-1)
    picked = chosen.index_select(0, row_ids)
    values = table.gather(1, picked[:, None]).squeeze(1).tolist()
    picked_ids = picked.tolist()
    widest = max(params[i].top_logprobs for i in rows)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if widest:
        found = table.topk(widest, dim=-1)
        top_values, top_ids = found.values.tolist(), found.indices.tolist()
    for r, i in enumerate(rows):
        n = params[i].top_logprobs
        top = [(t, v) for t, v in zip(top_ids[r][:n], top_values[r][:n]) if v != float("-inf")]
        out[i] = TokenLogprob(token_id=picked_ids[r], logprob=values[r], top=top)
    return out
