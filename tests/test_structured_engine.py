"""Structured outputs in the engine: batched with other requests, preempted, cut by
max_tokens, and against min_tokens, ignore_eos and token bans.
"""

from __future__ import annotations

import json

import jsonschema

from flashserve.engine.sampling_params import SamplingParams
from tests.structured_catalogue import SCHEMAS, schema_format
from tests.structured_harness import assert_all_valid, prompt, sampled

pytest_plugins = ["tests.tokenizer_fixtures", "tests.structured_harness"]


# -- engine behaviour -----------------------------------------------------------


def test_unconstrained_requests_are_unaffected_by_constrained_neighbours(sp):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = {f"plain{i}": (prompt(1000 + i), greedy) for i in range(4)}
    alone = sp.run(plain)
    nested = sp.grammar(schema_format("nested"))
    constrained = {
        f"json{i}": (
            prompt(2000 + i),
            SamplingParams(temperature=0.0, max_tokens=200, grammar=nested),
        )
        for i in range(3)
    }
    together = sp.run({**plain, **constrained})
    for rid in plain:
        assert together[rid] == alone[rid]
    # Constrained greedy rows are also the same alone and in company.
    for rid, request in constrained.items():
        assert sp.run({rid: request})[rid] == together[rid]
        assert together[rid][1] == "stop"


def test_preemption_does_not_refeed_the_matcher(sp):
    """Recompute after preemption replays output tokens through the model, not the grammar."""
    grammar = sp.grammar(schema_format("defs_ref"))
    requests = {
        f"r{i}": (
            [1] + [5 + (i * 13 + j) % 30000 for j in range(60)],
            SamplingParams(temperature=0.0, max_tokens=200, grammar=grammar),
        )
        for i in range(8)
    }
    expected = sp.run(requests)
    # 20 blocks of 16 tokens cannot hold 8 sequences of ~90 tokens: preemptions happen.
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    engine = sp.engine(kv_cache_memory_gb=20 * block_bytes / (1 << 30), enable_prefix_caching=False)
    got = sp.run(requests, engine)
    assert engine.scheduler.total_preemptions > 0
    assert got == expected
    assert_all_valid(sp, {f"schema:defs_ref:{rid}": v for rid, v in got.items()})


def test_max_tokens_cut_ends_with_length_and_a_valid_prefix(sp):
    grammar = sp.grammar(schema_format("nested"))
    results = sp.run({"r": (prompt(1), sampled(grammar, max_tokens=5))})
    tokens, finish = results["r"]
    assert finish == "length" and len(tokens) == 5
    matcher = grammar.new_matcher()
    assert all(matcher.accept_token(t) for t in tokens)
    assert not matcher.is_terminated()


def test_grammar_wins_over_min_tokens_and_ignore_eos(sp):
    """EOS is allowed only when the grammar can end; then it ends the output, whatever
    min_tokens or ignore_eos say, because anything after it would break the format."""
    grammar = sp.grammar(schema_format("dice"))
    results = sp.run(
        {
            "min_tokens": (prompt(1), sampled(grammar, min_tokens=50)),
            "ignore_eos": (prompt(2), sampled(grammar, ignore_eos=True)),
        }
    )
    for tokens, finish in results.values():
        assert finish == "stop"
        assert 1 <= json.loads(sp.text(tokens, finish)) <= 6


def test_bans_that_leave_no_grammar_token_fall_back_to_the_grammar(sp):
    grammar = sp.grammar(schema_format("enums"))
    brace = [i for t, i in sp.tokenizer.get_vocab().items() if t.startswith(("{", "▁{"))]
    results = sp.run({"r": (prompt(3), sampled(grammar, bad_token_ids=tuple(brace)))})
    tokens, finish = results["r"]
    assert finish == "stop"
    jsonschema.validate(json.loads(sp.text(tokens, finish)), SCHEMAS["enums"])
