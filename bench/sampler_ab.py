"""The sampler's whole-vocabulary path, before and after its CPU rewrites, same process.

    python bench/sampler_ab.py [--vocabs 32768,151936] [--batch-sizes 1,64]
        [--top-p 0.95] [--repeats 7] [--cell-seconds 6] [--kernel] [--threads N]

With --kernel, "before" is today's draw with the torch passes and "after" the same
with csrc/vocab_race.c (engine/vocab_race.py), the only difference.

Rows with a nucleus (top_p) and no top-k, the usual OpenAI-style request, sampled
at temperature 1 over fp32 logits of two kinds: "flat" (randn * 0.5: the nucleus
spans thousands of tokens, as for a random-weight model or a high temperature) and
"peaked" (randn * 5: a nucleus of a few tokens). Timed: the sampler's _draw for the
batch (truncation and draw; the logits processors, temperature and logprobs are the
same either way and left out).

"before" is the code this change replaced, copied below: a top-1024 check for every
such row, then either the 1024 candidates (nucleus inside them) or a full sort of
the vocabulary with exponential_() noise for every token. "after" is today's
flashserve.engine.sampler._draw: rejection sampling, a two-round race over the
untruncated distribution whose proposal stands where certainly_kept vouches for it,
the radix select for the cut-off (no sort) only for the other rows, with noise made
from uniforms (-log U). (Until 2026-11-28 15:40 "after" was the radix select for
every row; bench/RESULTS.md has both tables.)
Each repeat times before and after back to back, alternating which goes first;
the table gives medians. Prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "packages"))

import torch  # noqa: E402

from flashserve.engine import vocab_race  # noqa: E402
from flashserve.engine.sampler import _draw  # noqa: E402

# The old whole-vocabulary draw (a sort, exponential_), kept for accelerators.
from flashserve.engine.sampler import _draw_by_sort as _old_draw_from_vocab  # noqa: E402
from flashserve.engine.sampling_params import SamplingParams  # noqa: E402
from flashserve.engine.sequence import Sequence  # noqa: E402

# The sort-based definition, unchanged: it was the old whole-vocabulary path.

# -- before: flashserve/engine/sampler.py as it was, renamed _old_* ---------------------

OLD_CANDIDATE_TOP_K_LIMIT = 1024


def _old_draw(
    logits: torch.Tensor, seqs: list[Sequence], top_p: list[float], device: torch.device
) -> torch.Tensor:
    """One sampled token per row (greedy rows get one too; the caller ignores it).

    Which path a row takes depends only on its own settings and logits, never on
    the rest of the batch, so a seeded request draws the same tokens in any batch.
    """
    limit = min(OLD_CANDIDATE_TOP_K_LIMIT, logits.shape[-1])
    small = [0 < s.params.top_k <= limit for s in seqs]
    whole_vocab_norm = _old_nucleus_within_candidates(logits, seqs, top_p, small, limit)
    ks = [limit if whole else s.params.top_k for s, whole in zip(seqs, whole_vocab_norm)]
    small = [a or b for a, b in zip(small, whole_vocab_norm)]
    for i, seq in enumerate(seqs):
        if seq.params.greedy:  # the caller takes the argmax: any cheap draw will do
            small[i], ks[i] = True, 1
    if all(small):
        return _old_draw_from_top_k(logits, seqs, top_p, ks, whole_vocab_norm, device)
    if not any(small):
        return _old_draw_from_vocab(logits, seqs, top_p, device)
    out = torch.empty(len(seqs), dtype=torch.long, device=device)
    for wanted in (True, False):
        rows = [i for i, s in enumerate(small) if s == wanted]
        index = torch.tensor(rows, device=device)
        picked = [seqs[i] for i in rows]
        row_top_p = [top_p[i] for i in rows]
        sub = logits.index_select(0, index)
        if wanted:
            row_ks = [ks[i] for i in rows]
            row_norm = [whole_vocab_norm[i] for i in rows]
            out[index] = _old_draw_from_top_k(sub, picked, row_top_p, row_ks, row_norm, device)
        else:
            out[index] = _old_draw_from_vocab(sub, picked, row_top_p, device)
    return out


def _old_nucleus_within_candidates(
    logits: torch.Tensor,
    seqs: list[Sequence],
    top_p: list[float],
    small: list[bool],
    limit: int,
) -> list[bool]:
    """Rows with a nucleus but no top-k whose nucleus lies within their `limit` best tokens.

    Such a row can draw from those candidates alone -- exactly, as long as its
    top-p mass is measured against the whole vocabulary -- instead of sorting
    the vocabulary. (min-p rows renormalise after min-p, so they keep the sort.)
    """
    rows = [
        i
        for i, s in enumerate(seqs)
        if not small[i] and top_p[i] < 1.0 and s.params.min_p == 0 and not s.params.greedy
    ]
    fits = [False] * len(seqs)
    if not rows:
        return fits
    sub = logits.index_select(0, torch.tensor(rows, device=logits.device))
    best = sub.topk(limit, dim=-1, sorted=False).values
    mass = (best - sub.logsumexp(dim=-1, keepdim=True)).exp().sum(dim=-1)
    # A hair of margin: the draw's cumulative sum must cross top_p inside the candidates.
    wanted = torch.tensor([top_p[i] for i in rows], device=logits.device) + 1e-4
    for i, ok in zip(rows, (mass >= wanted).tolist()):
        fits[i] = ok
    return fits


def _old_draw_from_top_k(
    logits: torch.Tensor,
    seqs: list[Sequence],
    top_p: list[float],
    ks: list[int],
    whole_vocab_norm: list[bool],
    device: torch.device,
) -> torch.Tensor:
    """The same truncation as _old_truncate (top-k, min-p, top-p), on each row's k best tokens.

    Rows marked `whole_vocab_norm` have no top-k of their own: their nucleus is
    measured against the whole vocabulary's mass, as _old_truncate would.
    """
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
        if any(whole_vocab_norm):
            whole = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
            rows = torch.tensor(whole_vocab_norm, device=device)[:, None]
            probs = torch.where(rows, whole, probs)
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


# -- the measurement --------------------------------------------------------------------


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000


def _draw_with_kernel(on: bool):
    """Today's _draw with csrc/vocab_race.c on or off (the torch passes)."""

    def draw(*args):
        saved = vocab_race.enabled
        vocab_race.enabled = on
        try:
            return _draw(*args)
        finally:
            vocab_race.enabled = saved

    return draw


def cell(
    vocab: int,
    batch: int,
    kind: str,
    top_p: float,
    repeats: int,
    budget_s: float,
    kernel_ab: bool = False,
):
    """Median ms of before and after, and the share of rows the old code sorted."""
    g = torch.Generator().manual_seed(vocab + batch)
    scale = {"flat": 0.5, "peaked": 5.0}[kind]
    logits = torch.randn(batch, vocab, generator=g) * scale
    params = SamplingParams(temperature=1.0, top_p=top_p, top_k=-1)
    seqs = [Sequence(f"r{i}", [1], params, token_ids=[1]) for i in range(batch)]
    tops = [top_p] * batch
    cpu = torch.device("cpu")
    fits = _old_nucleus_within_candidates(
        logits, seqs, tops, [False] * batch, OLD_CANDIDATE_TOP_K_LIMIT
    )
    pair = ((_old_draw, logits, seqs, tops, cpu), (_draw, logits, seqs, tops, cpu))
    if kernel_ab:
        pair = tuple((_draw_with_kernel(on), logits, seqs, tops, cpu) for on in (False, True))
    for fn, *args in pair:  # warm-up
        fn(*args)
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            fn, *args = pair[which]
            times[which].append(_timed(fn, *args))
        if r >= 2 and time.perf_counter() - started > budget_s:
            break
    sorted_share = 1 - sum(fits) / batch
    return statistics.median(times[0]), statistics.median(times[1]), sorted_share, len(times[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="32768,151936")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cell-seconds", type=float, default=6.0, help="stop repeating after")
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="before: today's draw with the torch passes; after: with csrc/vocab_race.c",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for kind in ("flat", "peaked"):
                before, after, share, n = cell(
                    vocab, batch, kind, args.top_p, args.repeats, args.cell_seconds, args.kernel
                )
                rows.append((vocab, batch, kind, share, before, after, n))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; fp32 logits, top_p {args.top_p}, "
        "no top-k, temperature 1, unseeded"
    )
    if args.kernel:
        print(
            "before: the two-round race by torch passes (softmax, nan_to_num, block sums, "
            "race, mass); after: csrc/vocab_race.c. Medians, alternating."
        )
    else:
        print(
            "before: top-1024 check, then the candidates or a full sort + noise for every "
            "token; after: two-round race, radix select only where unsure. Medians, alternating."
        )
    print()
    print(
        "| vocab | batch | logits | rows sorted before | before ms | after ms | speed-up | repeats |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for vocab, batch, kind, share, before, after, n in rows:
        sorted_before = "-" if args.kernel else f"{share:.0%}"  # the old code's rule
        print(
            f"| {vocab} | {batch} | {kind} | {sorted_before} | {before:.2f} | {after:.2f} "
            f"| {before / after:.1f}x | {n} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
