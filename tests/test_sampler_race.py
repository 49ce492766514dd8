"""The CPU draw over the whole vocabulary as rejection sampling: a two-round race
over every token proposes, certainly_kept vouches for proposals without the radix
select, and nothing else may change what is drawn (tests/test_sampler.py checks the
draws against the renormalised nucleus)."""

from __future__ import annotations

import torch

from flashserve.engine import truncation
from flashserve.engine.sampler import _race
from flashserve.engine.truncation import block_sums, certainly_kept, kept_probs, mass_at_least
from tests.sampling_harness import mixed_batch, seq_with


def test_certainly_kept_vouches_only_for_tokens_the_truncation_keeps():
    logits, params = mixed_batch(
        5000, 3, top_ps=(0.3, 0.9, 0.99, 1.0), min_ps=(0.0, 0.05), top_ks=(-1, 3000)
    )
    top_p = [p.top_p for p in params]
    probs = torch.softmax(logits, dim=-1)
    kept = kept_probs(logits, params, top_p) > 0
    # Every row's tokens by rank, so each nucleus's edge (and its ties) is tried.
    ranked = probs.argsort(dim=-1, descending=True)
    vouched = 0
    for rank in list(range(0, 5000, 7)) + [4999]:
        tokens = ranked[:, rank]
        sure = torch.tensor(certainly_kept(probs, tokens, params, top_p))
        assert not (sure & ~kept.gather(1, tokens[:, None])[:, 0]).any(), rank
        vouched += int(sure.sum())
    assert vouched > 0
    # Only a nucleus (or nothing) is vouched for: min-p and top-k rows always ask.
    tokens = ranked[:, 0]
    sure = certainly_kept(probs, tokens, params, top_p)
    for row, p in enumerate(params):
        if p.min_p > 0 or p.top_k > 0:
            assert not sure[row]


def test_the_two_round_race_draws_each_token_with_its_probability():
    """Blocks race by their mass, then the winning block's tokens by theirs: token i
    wins with p_i, also in the last, shorter block (1000 = 3 x 256 + 232)."""
    torch.manual_seed(0)
    vocab, rows, calls = 1000, 2000, 20
    g = torch.Generator().manual_seed(1)
    base = torch.stack([torch.randn(vocab, generator=g) * s for s in (0.5, 2.0)])
    base[1, 900:] += 3.0  # much of the second row's mass in the short block
    probs = torch.softmax(base, dim=-1)
    seqs = [seq_with([1], [], temperature=1.0) for _ in range(rows)]
    counts = torch.zeros(2, vocab)
    for _ in range(calls):
        for r in range(2):
            drawn = _race(probs[r].repeat(rows, 1), block_sums(probs[r].repeat(rows, 1)), seqs)
            counts[r] += torch.bincount(drawn, minlength=vocab).float()
    got = counts / (rows * calls)
    for r in range(2):
        # Tokens grouped by rank, 20 groups of 50: the sampling noise is ~0.01 there.
        group = torch.empty(vocab, dtype=torch.long)
        group[probs[r].argsort(descending=True)] = torch.arange(vocab) // 50
        by_group = torch.zeros(2, 20).index_add_(1, group, torch.stack([got[r], probs[r]]))
        assert 0.5 * (by_group[0] - by_group[1]).abs().sum() < 0.03, r
        for block in range(4):  # each block's share, tighter
            part = slice(block * 256, (block + 1) * 256)
            assert abs(float(got[r, part].sum() - probs[r, part].sum())) < 0.01, (r, block)


def test_a_seeded_race_is_the_same_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(6, 50000, generator=g), dim=-1)
    seeded = [seq_with([1], [], temperature=1.0, seed=s) for s in range(6)]

    def fresh_generators() -> None:
        for s in seeded:
            s.generator = torch.Generator().manual_seed(s.params.seed)

    fresh_generators()
    together = _race(probs, block_sums(probs), seeded).tolist()
    fresh_generators()
    alone = [
        _race(probs[i : i + 1], block_sums(probs[i : i + 1]), seeded[i : i + 1]).item()
        for i in range(6)
    ]
    assert together == alone


def test_the_nucleus_mass_kernel_sums_what_the_torch_passes_sum():
    """csrc/mass_at_least.c: the mass at or above each row's floor, as row_sums of the
    masked row (to float32 rounding), the same bits alone and in a batch, and a
    vocabulary that is not a multiple of its blocks or lanes."""
    assert truncation.MASS_KERNEL.load() is not None, truncation.MASS_KERNEL.load_failed
    g = torch.Generator().manual_seed(3)
    for vocab in (32768, 1003, 5):
        probs = torch.softmax(torch.randn(9, vocab, generator=g) * 3, dim=-1)
        floors = probs.gather(1, torch.randint(vocab, (9, 1), generator=g))
        floors[0] = 0.0  # the whole row
        floors[1] = 2.0  # nothing
        got = mass_at_least(probs, floors)
        expected = truncation.row_sums(torch.where(probs >= floors, probs, 0.0))
        assert got.dtype == torch.float64
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9), (vocab, got, expected)
        assert got[1] == 0.0
        alone = torch.cat([mass_at_least(probs[i : i + 1], floors[i : i + 1]) for i in range(9)])
        assert torch.equal(got, alone)
