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
vocabulary. There, on the CPU (_draw_from_vocab), a two-round race over the
untruncated distribution proposes a token, which stands where the truncation
keeps it (rejection sampling); only rows whose proposal is not surely kept find
their top-k / nucleus cut-off, by a radix select instead of a sort. Requests
with a seed draw E from their own generator, and every stage leaves a row that
does not ask for it bit-for-bit unchanged, so a seeded request's tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.engine import vocab_race
from flashserve.engine.host_transfer import Download, upload
from flashserve.engine.logits_processors import apply_logits_processors, edits_logits
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence, TokenLogprob
from flashserve.engine.truncation import (
    CROSSING_BLOCK,
    block_sums,
    certainly_kept,
    kept_probs,
    truncate_logits,
    vouched,
)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class SampledBatch:
    """A step's draws, still on the device: `tokens` [B] feeds the next step's inputs
    there, and `resolve` brings tokens and logprobs to the host (waiting for this step
    only, not for work queued after it)."""

    def __init__(
        self, tokens: torch.Tensor, logprobs: _LogprobTensors | None, params: list[SamplingParams]
    ) -> None:
        self.tokens = tokens
        self._tokens = Download(tokens)
        self._logprobs = logprobs
        self._params = params

    def resolve(self) -> SamplerOutput:
        token_ids = self._tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if self._logprobs is not None:
            logprobs = self._logprobs.resolve(self._params)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


class Sampler:
    def __init__(
        self, device: torch.device, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).resolve()

    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], private: bool = False
    ) -> SampledBatch:
        """Draw one token per row; nothing here waits for the device (see SampledBatch).

        logits: [rows, >= vocab] in any float dtype (the runner's are the model's own).
        private: the caller hands over logits nobody else reads (the runner's fresh ones),
        so fp32 ones are edited in place instead of copied first.
        """
        logits = logits[:, : self.vocab_size]
        params = [s.params for s in seqs]
        temps = None
        if any(p.temperature not in (0.0, 1.0) for p in params):
            temps = upload(
                [p.temperature if not p.greedy else 1.0 for p in params],
                torch.float32,
                self.device,
            )
        if _raced_raw(logits, seqs):
            # The race reads the model's logits as they are (bf16 too) and divides by
            # the temperature as it goes: no [rows, vocab] fp32 copy, no pass to scale it.
            top_p = [effective_top_p(p, s.num_output_tokens) for p, s in zip(params, seqs)]
            chosen = _draw_from_vocab(logits, seqs, top_p, self.device, temps)
            return SampledBatch(chosen, _logprob_tensors(logits, chosen, params, temps), params)

        # The processors and the temperature edit the logits in place.
        logits = logits.to(torch.float32, copy=not private)
        logits = apply_logits_processors(logits, seqs, self.eos_token_ids)
        if temps is not None:
            logits.div_(temps[:, None])  # the private copy: no second [rows, vocab] buffer

        if all(p.greedy for p in params):
            chosen = logits.argmax(dim=-1)
        else:
            top_p = [effective_top_p(p, s.num_output_tokens) for p, s in zip(params, seqs)]
            chosen = _draw(logits, seqs, top_p, self.device)
            if any(p.greedy for p in params):  # else skip a pass over the vocabulary
                greedy = upload([p.greedy for p in params], torch.bool, self.device)
                chosen = torch.where(greedy, logits.argmax(dim=-1), chosen)
        return SampledBatch(chosen, _logprob_tensors(logits, chosen, params), params)


def _raced_raw(logits: torch.Tensor, seqs: list[Sequence]) -> bool:
    """Whether every row goes to _draw_from_vocab's race with the logits as the model gave
    them: the CPU race kernel, no greedy or small top-k row, no logits processor."""
    limit = min(CANDIDATE_TOP_K_LIMIT, logits.shape[-1])
    return (
        logits.device.type == "cpu"
        and vocab_race.enabled
        and not any(s.params.greedy or 0 < s.params.top_k <= limit or edits_logits(s) for s in seqs)
    )


def scaled_logits(
    logits: torch.Tensor, temps: torch.Tensor | None, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 logits / temperature (of the given rows): the bits Sampler.sample's own
    conversion and division give, for rows that need them after a raw race."""
    if rows is not None:  # a new tensor: the division may go in place
        logits = logits.index_select(0, rows)
        temps = None if temps is None else temps.index_select(0, rows)
    if temps is None:
        return logits.to(torch.float32)
    return logits.to(torch.float32, copy=rows is None).div_(temps[:, None])


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
        index = upload(rows, torch.long, device)
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
    logits: torch.Tensor,
    seqs: list[Sequence],
    top_p: list[float],
    device: torch.device,
    temps: torch.Tensor | None = None,
) -> torch.Tensor:
    """A token from each row's truncated distribution (truncate_logits's), without a sort.

    logits: fp32 and scaled, or (temps given, or another dtype) as the model gave them,
    to be read as scaled_logits(logits, temps).

    On the CPU, rejection sampling with the untruncated distribution as the proposal:
    _race draws from it with a few hundred noise draws a row instead of one a token,
    and the proposal stands where the truncation keeps it. Whether it does is
    settled by one pass over the row where it surely does (certainly_kept); the
    other rows, about 1 - top_p of those with a nucleus (and every row with min-p or
    a large top-k), run kept_probs's radix select, which settles it exactly and, where
    the proposal is dropped, gives the distribution to draw again from, by a race with
    fresh noise. Accepting exactly the kept proposals gives each kept token its
    renormalised probability: p_i + (1 - kept mass) * p_i / kept mass.

    Not inverse-CDF sampling (one uniform a row, the token where the running sum of
    the probabilities passes it), though it costs less still: which token that
    picks moves with rounding anywhere before it in the vocabulary, and a model's
    logits for a request differ in their last bits with the batch around it (a
    GEMM's blocking follows the batch's size), so seeded requests would no longer
    reproduce their tokens in another batch. A race compares p / E one token (or
    block) at a time: a last-bit difference changes its winner only in a near-tie.
    """
    params = [s.params for s in seqs]
    if logits.device.type != "cpu":
        return _draw_by_sort(scaled_logits(logits, temps), seqs, top_p, device)
    block_u, token_u = _race_noise(logits, seqs, torch.float32)
    log_block_u, log_token_u = block_u.log_(), token_u.log_()
    # The softmax, race and check in one pass per row where the kernel loads: the same bits.
    raced = vocab_race.race_over_vocab(logits, log_block_u, log_token_u, temperatures=temps)
    if raced is not None:
        chosen = raced.chosen
        sure = vouched(
            raced.chosen_prob, raced.through, raced.mass, logits.shape[-1], params, top_p
        )
    else:
        logits, temps = scaled_logits(logits, temps), None
        probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)
        totals = block_sums(probs)
        chosen = _race_with(probs, totals, log_block_u, log_token_u)
        sure = certainly_kept(probs, chosen, params, top_p, totals)
    rows = [i for i, kept in enumerate(sure) if not kept]
    if rows:
        unsure = upload(rows, torch.long, logits.device)
        kept = kept_probs(
            scaled_logits(logits, temps, unsure),
            [params[i] for i in rows],
            [top_p[i] for i in rows],
        )
        redrawn = redraw(kept, [seqs[i] for i in rows])
        # Accepted exactly when the truncation keeps the proposal, unsure or not:
        # anything else would skew the kept tokens' shares.
        proposed = chosen.index_select(0, unsure)
        accepted = kept.gather(1, proposed[:, None])[:, 0] > 0
        chosen[unsure] = torch.where(accepted, proposed, redrawn)
    return chosen


def redraw(kept: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """A token from each row's kept probabilities (zero where truncated): the race in two
    rounds, as for the proposal, with fresh noise; V / 256 + 256 uniforms a row, not V
    (torch draws and takes logs of uniforms at ~3 ns each on the CPU)."""
    block_u, token_u = _race_noise(kept, seqs)
    return _race_with(kept, block_sums(kept), block_u.log_(), token_u.log_())


def _race(probs: torch.Tensor, totals: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's winner of the exponential race (argmax p / E) over all its tokens.

    In two rounds: blocks of CROSSING_BLOCK tokens race with their total probability,
    then the winning block's tokens race with their own. The best p / E in a set is
    distributed as the set's total p over one E, so the winner is distributed as in
    one race over every token (token i with probability p_i), for V / 256 + 256
    uniforms a row instead of V. totals: block_sums(probs), the same bits in any
    batch. Seeded rows draw their uniforms from their own generator.
    """
    block_u, token_u = _race_noise(probs, seqs)
    return _race_with(probs, totals, block_u.log_(), token_u.log_())


def _race_noise(
    scores: torch.Tensor, seqs: list[Sequence], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The race's uniforms for rows over scores' vocabulary: float64 [rows, blocks] for
    the blocks' round, [rows, CROSSING_BLOCK] of `dtype` (scores') for the tokens'. Seeded
    rows draw theirs from their own generator, blocks' first."""
    rows, vocab = scores.shape
    blocks = -(-vocab // CROSSING_BLOCK)
    block_u = torch.empty((rows, blocks), dtype=torch.float64, device=scores.device).uniform_()
    token_u = torch.empty(
        (rows, CROSSING_BLOCK), dtype=dtype or scores.dtype, device=scores.device
    ).uniform_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            block_u[i].uniform_(generator=seq.generator)
            token_u[i].uniform_(generator=seq.generator)
    return block_u, token_u


def _race_with(
    probs: torch.Tensor, totals: torch.Tensor, log_block_u: torch.Tensor, log_token_u: torch.Tensor
) -> torch.Tensor:
    """_race's two rounds given the logs of its uniforms (the argmax of p / E, E = -log U,
    is the argmin of p / log U)."""
    rows, vocab = probs.shape
    block = CROSSING_BLOCK
    first = torch.div(totals, log_block_u).argmin(dim=-1)
    index = first[:, None] * block + torch.arange(block, device=probs.device)[None, :]
    weights = probs.gather(1, index.clamp(max=vocab - 1)) * (index < vocab)
    return index.gather(1, torch.div(weights, log_token_u).argmin(dim=-1, keepdim=True))[:, 0]


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
    drop = ranks >= upload(ks, torch.long, device)[:, None]
    # min-p keeps p >= min_p * p_max, i.e. logit - best_logit >= log(min_p).
    if any(p.min_p > 0 for p in params):
        log_min_p = upload([p.min_p for p in params], torch.float32, device).log()[:, None]
        drop |= values - values[:, :1] < log_min_p
    if any(tp < 1.0 for tp in top_p):
        probs = torch.softmax(values.masked_fill(drop, float("-inf")), dim=-1)
        nucleus = upload(top_p, torch.float32, device)[:, None]
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


@dataclass
class _LogprobTensors:
    """The logprob entries of the rows that asked, on the device until resolved."""

    rows: list[int]
    values: Download  # the chosen tokens' logprobs
    picked: Download  # the chosen tokens
    top_values: Download | None
    top_ids: Download | None

    def resolve(self, params: list[SamplingParams]) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(params)
        values, picked_ids = self.values.tolist(), self.picked.tolist()
        top_values: list[list[float]] = [[] for _ in self.rows]
        top_ids: list[list[int]] = [[] for _ in self.rows]
        if self.top_values is not None and self.top_ids is not None:
            top_values, top_ids = self.top_values.tolist(), self.top_ids.tolist()
        for r, i in enumerate(self.rows):
            n = params[i].top_logprobs
            top = [(t, v) for t, v in zip(top_ids[r][:n], top_values[r][:n]) if v != float("-inf")]
            out[i] = TokenLogprob(token_id=picked_ids[r], logprob=values[r], top=top)
        return out


def _logprob_tensors(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    params: list[SamplingParams],
    temps: torch.Tensor | None = None,
) -> _LogprobTensors | None:
    """Logprob entries for the rows that asked, from one log-softmax and one top-k
    (logits read as scaled_logits(logits, temps))."""
    rows = [i for i, p in enumerate(params) if p.logprobs]
    if not rows:
        return None
    row_ids = upload(rows, torch.long, logits.device)
    table = torch.log_softmax(scaled_logits(logits, temps, row_ids), dim=-1)
    picked = chosen.index_select(0, row_ids)
    values = table.gather(1, picked[:, None]).squeeze(1)
    widest = max(params[i].top_logprobs for i in rows)
    top_values = top_ids = None
    if widest:
        found = table.topk(widest, dim=-1)
        top_values, top_ids = Download(found.values), Download(found.indices)
    return _LogprobTensors(rows, Download(values), Download(picked), top_values, top_ids)
