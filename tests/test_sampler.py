"""Issue 3, sampling side: the sampler's truncation, seeds and logprobs, and bans over
many sampled tokens, on LLMEngine over a tiny random Llama.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.params import TOP_P_DECAY, ModelDefaults, to_sampling_params
from flashserve.engine import sampler as sampler_module
from flashserve.engine.sampler import Sampler, effective_top_p
from flashserve.engine.sampling_params import SamplingParams
from tests.sampling_harness import (
    VOCAB,
    contains_run,
    make_engine,
    mixed_batch,
    prompts,
    run_all,
    seq_with,
)
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


# -- the whole-vocabulary path: radix-select cut-off, inverse-CDF draw -------------


def _nucleus_f64(probs: torch.Tensor, params: SamplingParams, top_p: float):
    """_truncate's rule with its sums in float64 (probs: min-p applied): how many
    tokens it keeps, and how close to the target the running mass passes there."""
    ranked = probs.double().sort(descending=True).values
    if 0 < params.top_k < ranked.numel():
        ranked[params.top_k :] = 0
    if top_p >= 1.0:
        return int((ranked > 0).sum()), 1.0
    before = ranked.cumsum(0) - ranked
    target = top_p * ranked.sum()
    keep = before < target
    keep[0] = True
    n = int(keep.sum())
    slack = min(float(target - before[n - 1]), float(before[min(n, len(before) - 1)] - target))
    return n, slack


@pytest.mark.parametrize("kernel", [True, False], ids=["truncate_rows.c", "torch"])
def test_the_vocabulary_cut_off_keeps_the_tokens_truncate_keeps(monkeypatch, kernel):
    """The nucleus, top-k and min-p as _truncate defines them, found without a sort."""
    from flashserve.engine import truncation

    monkeypatch.setattr(truncation, "truncate_kernel_enabled", kernel)
    from flashserve.engine.truncation import kept_probs as _kept_probs
    from flashserve.engine.truncation import truncate_logits as _truncate

    vocab = 32768
    logits, params = mixed_batch(
        vocab, 1, top_ps=(0.5, 0.9, 0.95, 0.99, 1.0), min_ps=(0.0, 0.05), top_ks=(-1, 3000)
    )
    top_p = [p.top_p for p in params]
    kept = _kept_probs(logits, params, top_p)
    reference = _truncate(logits, params, top_p, "cpu") > float("-inf")
    probs = torch.softmax(logits, dim=-1)
    for row, p in enumerate(params):
        ours = kept[row] > 0
        # Exactly as many tokens as the rule keeps (its sums in float64) ...
        min_p_probs = probs[row].masked_fill(probs[row] < probs[row].max() * p.min_p, 0.0)
        count, slack = _nucleus_f64(min_p_probs, p, p.top_p)
        assert int(ours.sum()) == count, (row, p)
        # ... and the same tokens as _truncate's sort: any difference lies among tokens
        # that tie with the cut-off, which a sort orders arbitrarily ...
        boundary = probs[row][ours].min()
        differ = ours ^ reference[row]
        assert bool((probs[row][differ] == boundary).all()), (row, p)
        # ... and as many, unless _truncate's float32 running sum passes the target
        # within its rounding of where the exact one does.
        if int(reference[row].sum()) != count:
            assert abs(int(reference[row].sum()) - count) == 1 and slack < 1e-5, (row, p)
        # The kept tokens are renormalised as _truncate's softmax would give them.
        if not differ.any():
            expected = torch.softmax(_truncate(logits[row : row + 1], [p], [p.top_p], "cpu"), -1)
            assert torch.allclose(kept[row] / kept[row].sum(), expected[0], rtol=1e-4, atol=1e-9)
    # The radix select's two ways past its first pass (gathering the keys of the crossing
    # bins, or histogramming all keys again) give the same bits: it may pick either.
    for share in (0.0, 2.0):
        monkeypatch.setattr(truncation, "RADIX_GATHER_SHARE", share)
        assert torch.equal(_kept_probs(logits, params, top_p), kept)


def _groups(want: torch.Tensor, probs: torch.Tensor, groups: int) -> torch.Tensor:
    """Each token's group: the kept tokens above the cut-off by rank, best first, in
    `groups` groups; then those that tie with the cut-off (a sort and the radix
    select may keep different ones of these); then the dropped ones."""
    kept = want > 0
    tied = probs == probs[kept].min()
    above = kept & ~tied
    group = torch.full(want.shape, groups + 1, dtype=torch.long)
    group[tied] = groups
    order = torch.where(above, want, -1.0).argsort(descending=True)[: int(above.sum())]
    group[order] = torch.arange(len(order)) * groups // max(len(order), 1)
    return group


def test_the_vocabulary_path_draws_the_renormalised_nucleus():
    """Empirical rates over many draws against softmax(_truncate(logits)), batch mixed."""
    from flashserve.engine.truncation import truncate_logits as _truncate

    torch.manual_seed(0)
    vocab, repeats, calls, groups = 4096, 25, 160, 16  # 4,000 draws a setting
    logits, params = mixed_batch(
        vocab,
        2,
        top_ps=(0.5, 0.95),
        min_ps=(0.0, 0.05),
        top_ks=(-1, 1500),
        shapes=("peaked", "flat", "ties"),  # constant rows: the cut-off test covers them
    )
    top_p = [p.top_p for p in params]
    expected = torch.softmax(_truncate(logits, params, top_p, "cpu"), dim=-1)
    sampler = Sampler(torch.device("cpu"), vocab, ())
    seqs = [seq_with([1], [], **vars(p)) for p in params] * repeats
    batch = logits.repeat(repeats, 1)
    counts = torch.zeros(len(params), vocab)
    for _ in range(calls):
        tokens = torch.tensor(sampler(batch, seqs).token_ids).view(repeats, len(params))
        counts.scatter_add_(1, tokens.T, torch.ones(len(params), repeats))
    draws = repeats * calls
    for row, p in enumerate(params):
        want, probs = expected[row], torch.softmax(logits[row], dim=-1)
        group = _groups(want, probs, groups)
        got = torch.zeros(groups + 2).scatter_add_(0, group, counts[row] / draws)
        rate = torch.zeros(groups + 2).scatter_add_(0, group, want)
        assert got[-1] == 0, (row, p)  # never a token outside the nucleus
        assert (got - rate).abs().sum() / 2 < 0.06, (row, p, (got - rate).abs().sum() / 2)


def test_seeded_rows_draw_the_same_tokens_alone_and_in_amixed_batch():
    """The vocabulary path with a seed is batch-independent, also for rows longer
    than torch's grain size (whose plain sum, alone, torch splits among threads)."""
    vocab, steps = 50000, 12
    sampler = Sampler(torch.device("cpu"), vocab, ())
    seeded = [
        dict(temperature=1.0, top_p=0.9, seed=1),
        dict(temperature=1.3, top_p=0.95, min_p=0.05, seed=2),
        dict(temperature=1.0, top_k=3000, top_p=0.9, seed=3),
        dict(temperature=1.0, seed=4),
    ]
    others = [
        dict(temperature=0.0),
        dict(temperature=1.0, top_k=20),
        dict(temperature=0.8, top_p=0.5),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=1.0, top_p=0.9),
    ]
    g = torch.Generator().manual_seed(7)
    shapes = [torch.randn(vocab, generator=g) * s for s in (0.5, 1.0, 3.0)]
    shapes.append((torch.randn(vocab, generator=g) * 2).bfloat16().float())  # ties

    def run(settings: list[dict]) -> list[list[int]]:
        seqs = [seq_with([1], [], **s) for s in settings]
        for seq, s in zip(seqs, settings):
            if "seed" in s:
                seq.generator = torch.Generator().manual_seed(s["seed"])
        steps_out = [
            sampler(shapes[t % len(shapes)].repeat(len(seqs), 1), seqs).token_ids
            for t in range(steps)
        ]
        return [list(row) for row in zip(*steps_out)]

    alone = [run([s])[0] for s in seeded]
    mixed = others[:2] + seeded[:2] + others[2:] + seeded[2:]
    together = run(mixed)
    assert [together[mixed.index(s)] for s in seeded] == alone
    assert len({tuple(tokens) for tokens in alone}) == len(alone)  # the seeds matter
    # A model's logits for a request differ in their last bits with the batch around
    # it; the draw must not amplify that (as an inverse CDF over the vocabulary would:
    # rounding anywhere before a token moves its interval).
    for shape in shapes:
        shape.mul_(1 + 3e-7 * torch.randn(vocab, generator=g))
    assert [run([s])[0] for s in seeded] == alone


def test_the_accelerator_path_draws_inside_the_same_nucleus():
    """_draw_by_sort (a sort and the exponential race: what non-CPU devices run)."""
    from flashserve.engine.sampler import _draw_by_sort
    from flashserve.engine.truncation import truncate_logits as _truncate

    logits, params = mixed_batch(4096, 3, top_ps=(0.5, 0.95), min_ps=(0.0, 0.05), top_ks=(-1,))
    top_p = [p.top_p for p in params]
    allowed = _truncate(logits, params, top_p, "cpu") > float("-inf")
    seqs = [seq_with([1], [], **vars(p)) for p in params]
    for _ in range(20):
        tokens = _draw_by_sort(logits, seqs, top_p, torch.device("cpu"))
        assert bool(allowed.gather(1, tokens[:, None]).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_raw_logits_race_gives_the_copied_and_scaled_paths_tokens(monkeypatch, dtype):
    """Where no row needs a logits processor, the CPU sampler races the model's logits as
    they are and divides by the temperature in the kernel: the tokens, logprobs and seeded
    generators' states of the path that copies to fp32 and divides first."""
    vocab = 4096
    draws = Sampler(torch.device("cpu"), vocab, (2,))

    def run(raw: bool):
        if not raw:
            monkeypatch.setattr(sampler_module, "_raced_raw", lambda *args: False)
        settings = [
            dict(temperature=t, top_p=p, seed=s, logprobs=s % 2 == 0, top_logprobs=s % 3)
            for s, (t, p) in enumerate([(0.8, 0.95), (1.0, 0.5), (0.3, 1.0), (1.7, 0.9)] * 2)
        ]
        seqs = [seq_with([1], [], **s) for s in settings]
        for seq in seqs:
            seq.generator = torch.Generator().manual_seed(seq.params.seed)
        g = torch.Generator().manual_seed(4)
        steps = []
        for _ in range(6):
            logits = (torch.randn(len(seqs), vocab + 64, generator=g) * 3).to(dtype)
            out = draws.sample(logits, seqs).resolve()
            steps.append((out.token_ids, out.logprobs))
        monkeypatch.undo()
        return steps, [seq.generator.get_state() for seq in seqs]

    assert sampler_module._raced_raw(torch.zeros(1, vocab), [seq_with([1], [], temperature=0.8)])
    raw, raw_states = run(True)
    copied, copied_states = run(False)
    assert raw == copied
    assert all(torch.equal(a, b) for a, b in zip(raw_states, copied_states))
