"""Speculative decoding (n-gram) keeps every guarantee of ordinary decoding.

Engines on a tiny random Llama, with and without speculation, run the same requests:
greedy tokens and logprobs are equal (over 200+ requests with max_tokens, stop tokens,
penalties, bans, min_tokens, logprobs, and under preemption); sampled tokens have the
same distribution (chi-square); seeded requests draw the same tokens; rejected draft
tokens' KV blocks are given back and never published to the prefix cache. Random
models loop, and half the prompts repeat themselves, so drafts get accepted.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from flashserve.config import EngineConfig
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from flashserve.engine.speculative.policy import SpeculationPolicy
from flashserve.engine.speculative.proposer import NgramProposer
from tests.engine_harness import VOCAB, make_engine, run_all
from tests.tiny_models import save_tiny_llama

SPEC = dict(speculative_method="ngram", num_speculative_tokens=4, speculative_policy="always")
EOS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("spec_model"))


def engine(model_dir, **overrides):
    return make_engine(model_dir, cpu_threads=1, **overrides)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Half random, half a short random phrase said several times (drafts from the prompt)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2:
            phrase = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 9))]
            out.append(phrase * rng.randrange(2, 5) + phrase[: rng.randrange(0, len(phrase))])
        else:
            out.append([rng.randrange(3, VOCAB) for _ in range(rng.choice([3, 17, 40, 90]))])
    return out


def params_mix(count: int, seed: int = 1) -> list[SamplingParams]:
    rng = random.Random(seed)
    mix = []
    for i in range(count):
        kind = i % 8
        p = SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 48))
        if kind == 1:
            p.logprobs, p.top_logprobs = True, 3
        elif kind == 2:
            p.repetition_penalty = 1.3
        elif kind == 3:
            p.frequency_penalty, p.presence_penalty = 0.4, 0.2
        elif kind == 4:
            p.min_tokens = min(p.max_tokens, 5)
            p.logit_bias = {EOS: 8.0}  # EOS likely, yet banned until min_tokens
        elif kind == 5:
            p.bad_sequences = ((rng.randrange(3, VOCAB), rng.randrange(3, VOCAB)),)
            p.bad_token_ids = (rng.randrange(3, VOCAB),)
        elif kind == 6:
            p.ignore_eos = True
        mix.append(p)
    return mix


def chi_square_p_value(table: list[list[int]]) -> float:
    """Pearson's test that the rows of a contingency table share one distribution."""
    rows = [sum(r) for r in table]
    cols = [sum(c) for c in zip(*table)]
    total = sum(rows)
    statistic = sum(
        (table[i][j] - rows[i] * cols[j] / total) ** 2 / (rows[i] * cols[j] / total)
        for i in range(len(rows))
        for j in range(len(cols))
    )
    dof = (len(rows) - 1) * (len(cols) - 1)
    # The chi-square survival function is the regularised upper incomplete gamma.
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))


def assert_same_logprobs(base, spec) -> None:
    for a, b in zip(base, spec):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def run_with_logprobs(engine_, requests):
    for rid, (prompt, params) in requests.items():
        engine_.add_request(rid, prompt, params)
    tokens = {rid: [] for rid in requests}
    logprobs = {rid: [] for rid in requests}
    finish = {}
    while engine_.has_work():
        for out in engine_.step():
            tokens[out.request_id].extend(out.new_token_ids)
            logprobs[out.request_id].extend(out.logprobs or [])
            if out.finished:
                finish[out.request_id] = (out.finish_reason, out.stop_reason)
    return tokens, logprobs, finish


def test_proposer_takes_the_longest_most_recent_match() -> None:
    proposer = NgramProposer(ngram_min=1, ngram_max=3, num_speculative_tokens=3)

    def draft(tokens, limit=None):
        return proposer.propose(Sequence("s", tokens, SamplingParams()), limit)

    # "7 8" occurs twice; the most recent occurrence (followed by 5 6) wins.
    assert draft([7, 8, 1, 2, 3, 7, 8, 5, 6, 9, 7, 8]) == [5, 6, 9]
    # The 3-gram "1 7 8" beats the more recent 2-gram "7 8".
    assert draft([1, 7, 8, 4, 4, 4, 7, 8, 5, 5, 1, 7, 8]) == [4, 4, 4]
    assert draft([5, 6, 7]) == []  # nothing repeats
    # A pattern running into the end continues itself.
    assert draft([3, 4, 3, 4]) == [3, 4, 3]
    assert draft([3, 4, 3, 4], limit=1) == [3]
    assert draft([3, 4, 3, 4], limit=0) == []


def test_proposer_index_grows_with_the_sequence() -> None:
    proposer = NgramProposer(ngram_min=2, ngram_max=2, num_speculative_tokens=2)
    seq = Sequence("s", [1, 2, 3, 9], SamplingParams())
    assert proposer.propose(seq) == []
    seq.token_ids += [1, 2]
    assert proposer.propose(seq) == [3, 9]
    seq.token_ids += [4, 1, 2]
    assert proposer.propose(seq) == [4, 1]  # the latest "1 2" is followed by 4


def test_config_rejects_bad_speculative_settings() -> None:
    with pytest.raises(ValueError, match="speculative_method"):
        EngineConfig.from_dict({"speculative_method": "eagle"})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig.from_dict({"speculative_method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="ngram_min"):
        EngineConfig.from_dict({"speculative_method": "ngram", "ngram_min": 3, "ngram_max": 2})
    with pytest.raises(ValueError, match="speculative_policy"):
        EngineConfig.from_dict({"speculative_policy": "sometimes"})


def test_greedy_tokens_and_logprobs_equal_over_many_requests(model_dir) -> None:
    count = 216
    requests = {
        f"r{i}": (prompt, params)
        for i, (prompt, params) in enumerate(zip(prompts(count), params_mix(count)))
    }
    base = engine(model_dir)
    spec = engine(model_dir, **SPEC)
    want_tokens, want_logprobs, want_finish = run_with_logprobs(base, requests)
    got_tokens, got_logprobs, got_finish = run_with_logprobs(spec, requests)
    assert got_tokens == want_tokens
    assert got_finish == want_finish
    for rid in requests:
        assert_same_logprobs(want_logprobs[rid], got_logprobs[rid])
        assert len(got_tokens[rid]) <= requests[rid][1].max_tokens
    stats = spec.speculator.stats
    assert stats.accepted_tokens > 0.3 * stats.draft_tokens > 0
    assert spec.steps < base.steps  # tokens came more than one a step
    assert spec.block_manager.num_used_blocks == 0  # nothing leaked

    # Stop tokens inside accepted runs: stop at a token each output has in its middle.
    stopping = {}
    for rid, (prompt, _) in requests.items():
        out = want_tokens[rid]
        if len(out) >= 6:
            stop = out[len(out) // 2]
            stopping[rid] = (
                prompt,
                SamplingParams(temperature=0.0, max_tokens=60, stop_token_ids=(stop,)),
            )
    want, _, want_finish = run_with_logprobs(base, stopping)
    got, _, got_finish = run_with_logprobs(spec, stopping)
    assert got == want and got_finish == want_finish
    assert sum(reason == ("stop", want[rid][-1]) for rid, reason in want_finish.items()) > 10


def test_greedy_tokens_equal_under_preemption(model_dir) -> None:
    count = 40
    requests = {
        f"p{i}": (prompt, SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True))
        for i, prompt in enumerate(prompts(count, seed=5))
    }
    want = run_all(engine(model_dir), requests)
    # ~1,500 token slots for 40 sequences that want up to ~120 each: they take turns.
    small = engine(model_dir, kv_cache_memory_gb=0.0012, **SPEC)
    got = run_all(small, requests)
    assert got == want
    assert small.scheduler.total_preemptions > 0
    assert small.speculator.stats.accepted_tokens > 0
    assert small.block_manager.num_used_blocks == 0


def test_rejected_draft_blocks_are_returned_and_never_published(model_dir) -> None:
    spec = engine(model_dir, **SPEC)
    bm = spec.block_manager
    # A prompt whose drafts keep failing at first: the model does not copy it.
    prompt = prompts(2, seed=9)[1]
    spec.add_request("a", prompt, SamplingParams(temperature=0.0, max_tokens=60))
    seq = spec.sequences["a"]
    rejected = 0
    while spec.has_work():
        spec.step()
        if seq.status.value == "finished":
            break
        # Only the blocks the known tokens need are held, never a rejected draft's.
        needed = bm.blocks_needed(seq.num_computed_tokens)
        assert needed <= len(seq.block_ids) <= bm.blocks_needed(seq.num_tokens)
        assert seq.num_computed_tokens == seq.num_tokens - 1
        rejected = spec.speculator.stats.draft_tokens - spec.speculator.stats.accepted_tokens
        # Every published block holds exactly the tokens its hash says.
        for i, h in enumerate(seq.block_hashes):
            block = seq.block_ids[i]
            if bm.block_hash[block] is not None:
                assert bm.block_hash[block] == h
                assert i < seq.num_computed_tokens // bm.block_size
    assert rejected > 0
    assert bm.num_used_blocks == 0
    # The cache holds only what greedy decoding wrote: the same request again hits it,
    # and gives the same tokens.
    again = run_all(spec, {"b": (prompt, SamplingParams(temperature=0.0, max_tokens=60))})
    first = run_all(
        engine(model_dir), {"b": (prompt, SamplingParams(temperature=0.0, max_tokens=60))}
    )
    assert again == first


def test_seeded_requests_draw_what_they_draw_without_speculation(model_dir) -> None:
    # Phrase prompts, with a bias towards the phrase so that sampled text repeats it.
    requests = {
        f"s{i}": (
            prompt,
            SamplingParams(
                temperature=0.8,
                top_p=0.9,
                max_tokens=30,
                seed=i,
                frequency_penalty=0.3,
                logit_bias={t: 4.0 for t in prompt},
            ),
        )
        for i, prompt in enumerate(prompts(48, seed=3)[1::2])
    }
    want = run_all(engine(model_dir), requests)
    spec = engine(model_dir, **SPEC)
    assert run_all(spec, requests) == want
    assert spec.speculator.stats.accepted_tokens > 0


def test_sampled_distribution_equals_the_non_speculative_one(model_dir) -> None:
    """Per-position token frequencies over many draws, spec vs not: chi-square p > 0.01.

    The prompt alternates two tokens that a logit bias makes likely (about a third of
    the mass each), so drafts (the alternation's continuation) are accepted often and
    rejected often. top_p and a frequency penalty (which depends on each position's
    own history) are on.
    """
    pair = [11, 23]
    prompt = pair * 6 + pair[:1]
    params = SamplingParams(
        temperature=1.0,
        top_p=0.9,
        frequency_penalty=0.5,
        logit_bias={t: 6.0 for t in pair},
        max_tokens=4,
        ignore_eos=True,
    )
    draws = 1536
    counts = {}
    # ngram_min 1: each sampled 11 or 23 drafts the alternation.
    for name, overrides in (("base", {}), ("spec", {**SPEC, "ngram_min": 1})):
        torch.manual_seed(1234)
        e = engine(model_dir, max_num_seqs=256, **overrides)
        out = run_all(e, {f"d{i}": (prompt, params) for i in range(draws)})
        counts[name] = [Counter(tokens[pos] for tokens in out.values()) for pos in range(4)]
        if overrides:
            stats = e.speculator.stats
            assert stats.draft_tokens > draws  # most decode steps draft
            assert 0.15 * stats.draft_tokens < stats.accepted_tokens < 0.9 * stats.draft_tokens
    for pos in range(4):
        base, spec = counts["base"][pos], counts["spec"][pos]
        tokens = sorted(set(base) | set(spec))
        # Rare tokens pooled into one cell, so every expected count is large enough.
        common = [t for t in tokens if base[t] + spec[t] >= 20]
        table = [
            [base[t] for t in common] + [sum(base[t] for t in tokens if t not in common)],
            [spec[t] for t in common] + [sum(spec[t] for t in tokens if t not in common)],
        ]
        if table[0][-1] + table[1][-1] == 0:
            table = [row[:-1] for row in table]
        assert len(table[0]) >= 3, "the distribution should not be degenerate"
        p_value = chi_square_p_value(table)
        assert p_value > 0.01, (pos, p_value, table)


def test_the_cost_rule_speculates_when_steps_cost_little_per_token() -> None:
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams()) for i in range(64)]
    drafts = {seq: [5, 6, 7, 8] for seq in seqs}
    for fixed, per_token in ((0.05, 0.0005), (0.0, 0.01)):
        policy = SpeculationPolicy()
        for step in range(40):
            for rows in (1, 64):  # each batch size with and without drafts
                tokens = rows * (1 + step % 5)
                policy.observe(rows, tokens, fixed + per_token * tokens)
        for seq in seqs:
            policy.record(seq, 4, 3)
        # Weight-bound steps (large fixed cost): small and large batches both gain.
        small = policy.choose(1, {seqs[0]: drafts[seqs[0]]})
        large = policy.choose(64, drafts)
        if fixed:
            assert small and len(large) > 0
        else:
            # Every token costs the same: nothing a draft earns beats one token a row.
            assert not small and not large


def test_a_sequence_whose_drafts_fail_stops_drafting() -> None:
    policy = SpeculationPolicy()
    good, bad = Sequence("g", [1], SamplingParams()), Sequence("b", [1], SamplingParams())
    for _ in range(20):
        policy.record(good, 4, 4)
        policy.record(bad, 4, 0)
    for step in range(40):
        policy.observe(2, 2 * (1 + step % 5), 0.02 + 0.004 * 2 * (1 + step % 5))
    chosen = policy.choose(2, {good: [1, 2, 3, 4], bad: [1, 2, 3, 4]})
    assert good in chosen and bad not in chosen


def test_the_cost_rule_decides_per_batch_size() -> None:
    """A step that costs the same for 1 to 5 tokens but grows with tokens past 64: speculate
    for one sequence, not for 64 (each batch size judged by its own measurements)."""
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams()) for i in range(64)]
    policy = SpeculationPolicy()
    for step in range(40):
        width = 1 + step % 5
        policy.observe(1, width, 0.05)
        policy.observe(64, 64 * width, 0.05 + 0.002 * 64 * width)
    for seq in seqs:
        policy.record(seq, 4, 3)
    assert policy.choose(1, {seqs[0]: [5, 6, 7, 8]})
    assert not policy.choose(64, {seq: [5, 6, 7, 8] for seq in seqs})


def test_an_abort_mid_draft_frees_everything_and_disturbs_no_one(model_dir) -> None:
    spec = engine(model_dir, **SPEC)
    phrase_prompts = prompts(6, seed=11)[1::2]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = run_all(engine(model_dir), {"keep": (phrase_prompts[0], greedy)})
    spec.add_request("keep", phrase_prompts[0], greedy)
    spec.add_request("drop", phrase_prompts[1], greedy)
    produced = []
    while spec.speculator.stats.drafts < 4:
        for out in spec.step():
            if out.request_id == "keep":
                produced.extend(out.new_token_ids)
    assert spec.abort("drop")
    while spec.has_work():
        for out in spec.step():
            produced.extend(out.new_token_ids)
    assert produced == alone["keep"]
    assert spec.block_manager.num_used_blocks == 0
