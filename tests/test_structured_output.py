"""Structured outputs (response_format) are always valid, even from a random-weight model.

A random model unconstrained writes noise; with the grammar mask every output must parse
and validate. Requests are batched into one engine run per tokenizer (fast on 2 cores), are
sampled at temperature 1.0 to walk many grammar paths, and must all end with finish_reason
"stop": max_tokens is far above the longest output these schemas allow in practice.
"""

from __future__ import annotations

import json

import pytest
import torch

from flashserve.engine.sampling_params import SamplingParams
from tests.structured_catalogue import GRAMMARS, SCHEMAS
from tests.structured_harness import Harness, assert_all_valid, build_mix, prompt, sampled
from tests.tiny_models import save_tiny_llama

pytest_plugins = ["tests.tokenizer_fixtures", "tests.structured_harness"]

PER_SCHEMA = 15  # x 14 schemas = 210 requests
PER_OTHER = 12  # json_object, each grammar, the structural tag


@pytest.fixture(scope="module")
def sp_results(sp) -> dict[str, tuple[list[int], str | None]]:
    """All SentencePiece requests in one engine run, as one batch."""
    torch.manual_seed(0)
    requests = build_mix(sp, list(SCHEMAS), PER_SCHEMA, PER_OTHER, list(GRAMMARS))
    return sp.run(requests, sp.engine(max_num_seqs=512))


# -- validity -------------------------------------------------------------------


def test_json_schema_outputs_all_validate(sp, sp_results):
    schema_results = {k: v for k, v in sp_results.items() if k.startswith("schema:")}
    assert len(schema_results) >= 200
    assert_all_valid(sp, schema_results)
    # Temperature 1.0 explores: the outputs are not one string repeated.
    texts = {sp.text(*v) for v in schema_results.values()}
    assert len(texts) > 120


def test_json_object_outputs_are_json_objects(sp, sp_results):
    assert_all_valid(sp, {k: v for k, v in sp_results.items() if k.startswith("object:")})


def test_json_object_without_bias_is_an_object_or_a_valid_prefix(sp):
    """Unbiased, a random model may write one endless string: cut by max_tokens, what it
    wrote so far is still a prefix the grammar accepts; what finished is an object."""
    grammar = sp.grammar({"type": "json_object"})
    torch.manual_seed(2)
    results = sp.run({f"r{i}": (prompt(i), sampled(grammar, max_tokens=24)) for i in range(8)})
    for tokens, finish in results.values():
        if finish == "stop":
            assert isinstance(json.loads(sp.text(tokens, finish)), dict)
        else:
            assert finish == "length"
            matcher = grammar.new_matcher()
            assert all(matcher.accept_token(t) for t in tokens)


def test_ebnf_grammar_outputs_parse(sp, sp_results):
    results = {k: v for k, v in sp_results.items() if k.startswith("grammar:")}
    assert len(results) == PER_OTHER * len(GRAMMARS)
    assert_all_valid(sp, results)


def test_structural_tag_outputs_match_the_tag(sp, sp_results):
    assert_all_valid(sp, {k: v for k, v in sp_results.items() if k.startswith("tag:")})


def test_byte_level_bpe_tokenizer(bpe_tokenizer, tmp_path_factory):
    vocab = len(bpe_tokenizer)  # 131,072
    model = save_tiny_llama(tmp_path_factory.mktemp("bpe-llama"), vocab_size=vocab)
    harness = Harness(bpe_tokenizer, model, vocab)
    torch.manual_seed(1)
    schemas = ["nested", "enums", "patterns", "defs_ref", "array_of_objects"]
    results = harness.run(build_mix(harness, schemas, 3, 3, ["sql", "query"]))
    assert_all_valid(harness, results)


def test_unconstrained_random_model_writes_noise(sp):
    """The control: without the mask the same model does not write JSON."""
    torch.manual_seed(0)
    results = sp.run(
        {f"r{i}": (prompt(i), SamplingParams(temperature=1.0, max_tokens=16)) for i in range(4)}
    )
    for tokens, finish in results.values():
        with pytest.raises(ValueError):
            json.loads(sp.text(tokens, finish))
