"""csrc/vocab_race.c: the CPU sampler's softmax, block totals, race and nucleus check in
one pass per row, against the torch passes it replaces (engine/vocab_race.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from flashserve.engine import sampler, vocab_race
from flashserve.engine.truncation import CROSSING_BLOCK, block_sums, mass_at_least
from flashserve.layers import native
from tests.sampling_harness import seq_with

# Where torch runs its 8-lane kernels the kernel repeats their arithmetic bit for bit;
# on others (AVX-512: 16 lanes, another sum order) only to rounding.
BITWISE = torch.backends.cpu.get_cpu_capability() == "AVX2"


def _noise(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = -(-vocab // CROSSING_BLOCK)
    block_u = torch.rand(rows, blocks, dtype=torch.float64, generator=g)
    return block_u.log(), torch.rand(rows, CROSSING_BLOCK, generator=g).log()


def _torch_passes(logits, log_block_u, log_token_u):
    """What sampler._draw_from_vocab computed before the kernel."""
    probs = torch.softmax(logits, dim=-1).nan_to_num_(nan=0.0)
    totals = block_sums(probs)
    chosen = sampler._race_with(probs, totals, log_block_u, log_token_u)
    chosen_prob = probs.gather(1, chosen[:, None])
    through = mass_at_least(probs, chosen_prob)
    mass = totals.cumsum(dim=-1)[:, -1]
    return probs, totals, chosen, chosen_prob[:, 0], through, mass


def _logits(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    if vocab > 8 and rows >= 4:
        x[1, 5] = float("-inf")  # a banned token
        x[2] = float("-inf")  # every token banned: NaN, then 0 everywhere
        x[3, 3] = float("nan")
    return x


@pytest.mark.parametrize("vocab", [32768, 151936, 1003, 256, 257, 13, 8])
def test_the_kernel_gives_the_torch_passes_results(vocab):
    """Probabilities, block totals, token, its probability, the mass at or above it and
    the row's mass, for vocabularies that are no multiple of the blocks or the lanes."""
    assert vocab_race.KERNEL.load() is not None, vocab_race.KERNEL.load_failed
    for scale in (0.5, 3.0, 12.0):
        logits = _logits(6, vocab, scale, seed=vocab)
        log_block_u, log_token_u = _noise(6, vocab, seed=1)
        got = vocab_race.race_over_vocab(logits, log_block_u, log_token_u, keep_probs=True)
        assert got is not None
        probs, totals, chosen, chosen_prob, through, mass = _torch_passes(
            logits, log_block_u, log_token_u
        )
        if BITWISE:
            assert torch.equal(got.probs, probs), (vocab, scale)
            assert torch.equal(got.totals, totals), (vocab, scale)
            assert torch.equal(got.chosen, chosen), (vocab, scale)
            assert torch.equal(got.chosen_prob, chosen_prob)
            assert torch.equal(got.through, through)
            assert torch.equal(got.mass, mass)
        else:
            # torch sums 16 lanes here, the kernel 8: each order of a block's 256 terms
            # is within n * 2^-24 (1.5e-5) of the exact sum, so the two within twice that.
            torch.testing.assert_close(got.probs, probs, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(got.totals, totals, rtol=4e-5, atol=1e-9)
            torch.testing.assert_close(got.mass, mass, rtol=4e-5, atol=1e-9)
        if vocab > 8:  # the all-banned row
            assert got.mass[2] == 0.0 and got.chosen_prob[2] == 0.0


def test_a_row_has_the_same_bits_alone_in_a_batch_and_at_any_thread_count():
    vocab, rows = 50000, 9
    logits = _logits(rows, vocab, 2.0, seed=4)
    log_block_u, log_token_u = _noise(rows, vocab, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(
                vocab_race.race_over_vocab(logits, log_block_u, log_token_u, keep_probs=True)
            )
            alone = [
                vocab_race.race_over_vocab(
                    logits[i : i + 1], log_block_u[i : i + 1], log_token_u[i : i + 1], True
                )
                for i in range(rows)
            ]
            for field in ("probs", "totals", "chosen", "chosen_prob", "through", "mass"):
                together = getattr(results[-1], field)
                assert torch.equal(together, torch.cat([getattr(a, field) for a in alone]))
    finally:
        torch.set_num_threads(threads)
    for field in ("probs", "chosen", "through", "mass"):
        assert all(torch.equal(getattr(r, field), getattr(results[0], field)) for r in results)
    # A strided batch (a slice of wider logits) reads the same rows.
    wide = torch.cat([logits, torch.zeros(rows, 40)], dim=1)[:, :vocab]
    strided = vocab_race.race_over_vocab(wide, log_block_u, log_token_u, keep_probs=True)
    assert torch.equal(strided.probs, results[0].probs)


def _seeded_runs(steps: int, kernel: bool, monkeypatch) -> tuple[list[list[int]], list]:
    monkeypatch.setattr(vocab_race, "enabled", kernel)
    vocab, rows = 32768, 12
    settings = [dict(temperature=1.0, top_p=tp, seed=s) for s, tp in enumerate([0.95, 0.5] * 6)]
    seqs = [seq_with([1], [], **s) for s in settings]
    for seq in seqs:
        seq.generator = torch.Generator().manual_seed(seq.params.seed)
    g = torch.Generator().manual_seed(9)
    tokens = []
    for step in range(steps):
        logits = torch.randn(rows, vocab, generator=g) * (0.5 + step % 3)
        top_p = [s.params.top_p for s in seqs]
        tokens.append(sampler._draw_from_vocab(logits, seqs, top_p, torch.device("cpu")).tolist())
    return tokens, [seq.generator.get_state() for seq in seqs]


def test_seeded_draws_are_the_torch_paths_tokens_and_consume_the_same_uniforms(monkeypatch):
    """The kernel path and the torch passes: the same tokens step after step (the same
    bits decide), and each request's generator left where the torch path leaves it."""
    with_kernel, states = _seeded_runs(16, True, monkeypatch)
    without, torch_states = _seeded_runs(16, False, monkeypatch)
    if BITWISE:
        assert with_kernel == without
    assert all(torch.equal(a, b) for a, b in zip(states, torch_states))
    again, _ = _seeded_runs(16, True, monkeypatch)
    assert again == with_kernel
    assert len({tuple(step) for step in with_kernel}) > 1


def test_shapes_are_checked_before_the_kernel_reads_anything():
    logits = torch.randn(3, 1000)
    log_block_u, log_token_u = _noise(3, 1000, seed=0)
    with pytest.raises(ValueError, match="log_block_u"):
        vocab_race.race_over_vocab(logits, log_block_u[:2], log_token_u)
    with pytest.raises(ValueError, match="log_token_u"):
        vocab_race.race_over_vocab(logits, log_block_u, log_token_u[:, :100])
    with pytest.raises(ValueError, match="log_block_u"):
        vocab_race.race_over_vocab(logits, log_block_u.float(), log_token_u)
    # Not the kernel's: the torch passes serve (None).
    assert vocab_race.race_over_vocab(logits.double(), log_block_u, log_token_u) is None
    assert vocab_race.race_over_vocab(logits.t().contiguous().t(), log_block_u, log_token_u) is None
    short = torch.randn(3, 5)
    assert vocab_race.race_over_vocab(short, *_noise(3, 5, seed=0)) is None


def test_without_a_compiler_the_torch_passes_serve_and_say_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(vocab_race, "KERNEL", vocab_race.KERNEL.fresh())
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("FLASHSERVE_KERNEL_CACHE", str(tmp_path))
    logits = torch.randn(4, 3000)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert vocab_race.race_over_vocab(logits, *_noise(4, 3000, seed=0)) is None
    assert "no C compiler" in caplog.text
    seqs = [seq_with([1], [], temperature=1.0, top_p=0.9) for _ in range(4)]
    drawn = sampler._draw_from_vocab(logits, seqs, [0.9] * 4, torch.device("cpu"))
    assert drawn.shape == (4,) and bool((drawn < 3000).all())


def test_without_torchs_exp_the_torch_passes_serve(monkeypatch, caplog):
    """A torch build that does not export Sleef's exp: no kernel (its softmax would not be
    torch's), said once."""
    monkeypatch.setattr(vocab_race, "EXP_SYMBOL", "no_such_exp_here")
    monkeypatch.setattr(vocab_race, "_exp_address", None)
    monkeypatch.setattr(vocab_race, "_exp_missing", None)
    logits = torch.randn(2, 1000)
    with caplog.at_level(logging.WARNING, logger=vocab_race.__name__):
        assert vocab_race.race_over_vocab(logits, *_noise(2, 1000, seed=0)) is None
        assert vocab_race.race_over_vocab(logits, *_noise(2, 1000, seed=0)) is None
    assert caplog.text.count("no_such_exp_here not found") == 1


@pytest.mark.parametrize("vocab", [32768, 1003, 13])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_raw_logits_with_temperatures_are_the_scaled_fp32_rows(vocab, dtype):
    """The model's logits as they come (bf16 too) with a temperature per row: the same
    bits as racing `logits.float() / t`, which the kernel no longer needs made."""
    raw = _logits(6, vocab, 3.0, seed=vocab).to(dtype)
    temps = torch.tensor([0.8, 1.0, 0.3, 1.7, 0.05, 1.0])
    log_block_u, log_token_u = _noise(6, vocab, seed=2)
    scaled = raw.float() / temps[:, None]
    want = vocab_race.race_over_vocab(scaled, log_block_u, log_token_u, keep_probs=True)
    got = vocab_race.race_over_vocab(
        raw, log_block_u, log_token_u, keep_probs=True, temperatures=temps
    )
    assert got is not None and want is not None
    for field in ("probs", "totals", "chosen", "chosen_prob", "through", "mass"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    with pytest.raises(ValueError, match="temperatures"):
        vocab_race.race_over_vocab(raw, log_block_u, log_token_u, temperatures=temps[:3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_16_lane_exp_gives_the_8_lane_exps_bits(monkeypatch, dtype):
    """Where the build has AVX-512 the kernel calls Sleef's 16-lane exp: every result
    (probabilities, totals, token, masses) has the bits the 8-lane one gives, over logits
    spread from far below the row's best (exp underflows) to it, with -inf and NaN rows."""
    if vocab_race.torch_exp16_address() is None:
        pytest.skip("this torch build has no Sleef_expf16_u10")
    vocab = 4099  # 16-lane blocks, then an 8-lane one, then a tail of 3
    logits = _logits(8, vocab, 40.0, seed=5)
    logits[4, ::7] = -200.0
    logits = logits.to(dtype)
    temps = torch.tensor([0.8, 1.0, 0.25, 2.0, 1.0, 0.6, 1.0, 3.0])
    noise = _noise(8, vocab, seed=6)
    results = []
    for wide in (True, False):
        monkeypatch.setattr(vocab_race, "use_exp16", wide)
        results.append(
            vocab_race.race_over_vocab(logits, *noise, keep_probs=True, temperatures=temps)
        )
    for field in ("probs", "totals", "chosen", "chosen_prob", "through", "mass"):
        assert torch.equal(getattr(results[0], field), getattr(results[1], field)), field
