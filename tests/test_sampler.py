"""Issue 3, sampling side: the sampler's truncation, seeds and logprobs, and bans over
many sampled tokens, on LLMEngine over a tiny random Llama.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from flashserve.api.protocol import ChatRequest
from flashserve.api.sampling import TOP_P_DECAY, ModelDefaults, to_sampling_params
from flashserve.engine.sampler import Sampler, effective_top_p
from flashserve.engine.sampling_params import SamplingParams
from tests.sampling_harness import VOCAB, contains_run, make_engine, prompts, run_all, seq_with
from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


# -- sampler: truncation, seeds, logprobs ----------------------------------------


def test_top_p_min_is_the_floor_of_a_decaying_nucleus():
    p = SamplingParams(top_p=0.9, top_p_min=0.3, top_p_decay=0.9)
    assert effective_top_p(p, 0) == 0.9
    assert effective_top_p(p, 3) == pytest.approx(0.9 * 0.9**3)
    assert effective_top_p(p, 50) == 0.3
    assert effective_top_p(SamplingParams(top_p=0.8), 50) == 0.8
    # The API turns the field on with the documented decay.
    request = ChatRequest.model_validate({"model": "m", "messages": [], "top_p_min": 0.2})
    params = to_sampling_params(
        request, ModelDefaults(), prompt_len=4, max_model_len=64, vocab_size=10
    )
    assert (params.top_p_min, params.top_p_decay) == (0.2, TOP_P_DECAY)


def test_late_tokens_of_a_decayed_nucleus_are_the_argmax():
    torch.manual_seed(0)
    sampler = Sampler(torch.device("cpu"), 64, ())
    logits = torch.randn(1, 64).repeat(2, 1)
    params = dict(temperature=1.0, top_k=-1, top_p=1.0, top_p_min=0.01, top_p_decay=0.9)
    fresh = seq_with([1], [], **params)
    late = seq_with([1], [3] * 100, **params)  # 0.9**100 is far below the floor
    draws = [sampler(logits, [fresh, late]).token_ids for _ in range(200)]
    assert {d[1] for d in draws} == {int(logits[1].argmax())}
    assert len({d[0] for d in draws}) > 5


def test_seed_gives_the_same_tokens_alone_and_beside_32_other_requests(model_dir):
    prompt = list(range(5, 40))
    seeded = SamplingParams(temperature=1.0, top_k=-1, seed=1234, max_tokens=32, ignore_eos=True)
    alone, _ = run_all(make_engine(model_dir), {"s": (prompt, seeded)})
    rng = random.Random(3)
    others = {}
    for i, p in enumerate(prompts(32, seed=3)):
        others[f"o{i}"] = (
            p,
            SamplingParams(
                temperature=rng.choice([0.0, 0.5, 1.0, 1.5]),
                top_p=rng.choice([1.0, 0.8]),
                top_k=rng.choice([-1, 20]),
                min_p=rng.choice([0.0, 0.05]),
                top_p_min=0.1,
                top_p_decay=0.9,
                repetition_penalty=rng.choice([1.0, 1.2]),
                frequency_penalty=rng.choice([0.0, 0.5]),
                presence_penalty=rng.choice([0.0, 0.5]),
                logit_bias={rng.randrange(VOCAB): 3.0},
                bad_token_ids=(rng.randrange(VOCAB),),
                logprobs=bool(i % 2),
                top_logprobs=5 if i % 2 else 0,
                seed=rng.choice([None, i]),
                max_tokens=rng.choice([8, 32, 40]),
                ignore_eos=True,
            ),
        )
    together, _ = run_all(make_engine(model_dir), {"s": (prompt, seeded), **others})
    assert together["s"] == alone["s"]
    other_seed = SamplingParams(temperature=1.0, top_k=-1, seed=99, max_tokens=32, ignore_eos=True)
    assert run_all(make_engine(model_dir), {"s": (prompt, other_seed)})[0]["s"] != alone["s"]


def test_logprobs_are_the_log_softmax_of_the_distribution_sampled_from(model_dir, engine):
    """Checked against transformers' own forward on the same weights."""
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = list(range(7, 30))
    cases = {
        "t07": SamplingParams(temperature=0.7, seed=5, max_tokens=8, ignore_eos=True),
        "greedy": SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        "pen": SamplingParams(
            temperature=1.0, seed=6, max_tokens=8, presence_penalty=1.5, logit_bias={9: 2.0}
        ),
    }
    for params in cases.values():
        params.logprobs, params.top_logprobs = True, 20
    tokens, outputs = run_all(engine, {k: (prompt, p) for k, p in cases.items()})
    for name, params in cases.items():
        ids = torch.tensor([prompt + tokens[name]])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt) - 1 : -1].float()
        for t, out in enumerate(outputs[name]):
            row = logits[t].clone()
            for seen in set(tokens[name][:t]):
                row[seen] -= params.presence_penalty
            for token, bias in params.logit_bias.items():
                row[token] += bias
            temperature = params.temperature or 1.0  # greedy reports temperature 1
            expected = torch.log_softmax(row / temperature, dim=-1)
            lp = out.logprobs[0]
            assert lp.token_id == tokens[name][t]
            assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=1e-4)
            top_ids = [i for i, _ in lp.top]
            assert top_ids == expected.topk(20).indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(
                expected.topk(20).values.tolist(), abs=1e-4
            )


def test_banned_tokens_never_appear_over_many_sampled_tokens(model_dir, engine):
    batch = {f"c{i}": p for i, p in enumerate(prompts(16, seed=5))}

    def sample(**extra):
        params = SamplingParams(temperature=1.3, top_k=-1, max_tokens=48, ignore_eos=True, **extra)
        return run_all(engine, {rid: (p, params) for rid, p in batch.items()})[0]

    control = sample()
    counts = Counter(t for toks in control.values() for t in toks)
    frequent = tuple(t for t, _ in counts.most_common(4))
    bigrams = Counter((a, b) for toks in control.values() for a, b in zip(toks, toks[1:]) if a != b)
    pair = bigrams.most_common(1)[0][0]
    assert contains_run([t for toks in control.values() for t in toks], pair)
    # Also pushed up by a bias, which the ban must still beat.
    banned = sample(bad_token_ids=frequent, logit_bias={t: 5.0 for t in frequent})
    assert not set(frequent) & {t for toks in banned.values() for t in toks}
    phrased = sample(bad_sequences=(pair,))
    assert not any(contains_run(toks, pair) for toks in phrased.values())


def test_a_nucleus_without_top_k_is_drawn_from_candidates_exactly():
    from flashserve.engine.sampler import (
        CANDIDATE_TOP_K_LIMIT,
        _nucleus_within_candidates,
        _truncate,
    )

    vocab, draws = 32768, 4000
    sampler = Sampler(torch.device("cpu"), vocab, ())
    peaked = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 5
    flat = torch.zeros(vocab)  # the nucleus spans ~90% of the vocabulary
    params = dict(temperature=1.0, top_k=-1, top_p=0.9)
    seqs = [seq_with([1], [], **params) for _ in range(draws)]
    half = draws // 2
    logits = torch.cat([peaked.repeat(half, 1), flat.repeat(draws - half, 1)])
    top_p = [0.9] * draws
    fits = _nucleus_within_candidates(logits, seqs, top_p, [False] * draws, CANDIDATE_TOP_K_LIMIT)
    assert fits == [True] * half + [False] * (draws - half)

    tokens = sampler(logits, seqs).token_ids
    # Peaked rows: only the nucleus that a full sort finds, at its renormalised rates.
    nucleus = torch.softmax(_truncate(peaked[None], [seqs[0].params], [0.9], "cpu")[0], dim=-1)
    counts = Counter(tokens[:half])
    assert all(nucleus[t] > 0 for t in counts)
    observed = torch.zeros(vocab)
    for t, n in counts.items():
        observed[t] = n / half
    assert (observed - nucleus).abs().sum() / 2 < 0.1  # total variation, 2,000 draws
    # Flat rows take the whole-vocabulary path: far more than the candidates appear.
    assert len(set(tokens[half:])) > CANDIDATE_TOP_K_LIMIT
