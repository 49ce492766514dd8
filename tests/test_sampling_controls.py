"""Issue 3, sampling side: every sampling control in the schema has its stated effect.

Numeric checks run on tensors and on LLMEngine over a tiny random Llama;
end-to-end checks go through ChatService over data/embedded_model (a real
32k SentencePiece tokenizer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import Counter

import pytest
import torch
from fastapi import HTTPException

from flashserve.api.bad_words import bad_word_sequences
from flashserve.api.protocol import ChatRequest
from flashserve.api.sampling import TOP_P_DECAY, ModelDefaults, to_sampling_params
from flashserve.config import EngineConfig
from flashserve.engine import logits_processors
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.logits_processors import apply_logits_processors
from flashserve.engine.sampler import Sampler, effective_top_p
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from tests.chat_harness import (
    EOS,
    body,
    call,
    content,
    make_service,
    recorded_tokens,
    streamed_content,
)
from tests.tiny_models import save_tiny_llama

VOCAB = 512
TINY_EOS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


@pytest.fixture(scope="module")
def service():
    svc = make_service()
    yield svc
    svc.engine.shutdown()


def make_engine(model_dir) -> LLMEngine:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.05, max_model_len=512)
    return LLMEngine(config, model_dir)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            outputs[out.request_id].append(out)
    return tokens, outputs


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.choice([4, 9, 23]))] for _ in range(count)]


def seq_with(prompt: list[int], output: list[int], **params) -> Sequence:
    return Sequence("r", list(prompt), SamplingParams(**params), token_ids=prompt + output)


def contains_run(tokens: list[int], run: tuple[int, ...]) -> bool:
    k = len(run)
    return any(tuple(tokens[i : i + k]) == run for i in range(len(tokens) - k + 1))


# -- processors, on tensors ----------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, 4.0, -5.0, 0.5]])
    seq = seq_with([0, 1], [2], repetition_penalty=2.0)  # seen: 0, 1 (prompt), 2 (output)
    out = apply_logits_processors(logits.clone(), [seq], ())
    assert out.tolist() == [[1.0, -2.0, 1.5, 4.0, -5.0, 0.5]]
    # Below 1 it encourages repetition, by the same rule.
    seq = seq_with([0, 1], [2], repetition_penalty=0.5)
    out = apply_logits_processors(logits.clone(), [seq], ())
    assert out.tolist() == [[4.0, -0.5, 6.0, 4.0, -5.0, 0.5]]


def test_frequency_and_presence_penalties_subtract_over_output_tokens_only():
    logits = torch.zeros(1, 8)
    seq = seq_with([1, 1, 1], [5, 5, 7], frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_logits_processors(logits, [seq], ())[0]
    assert out[5].item() == pytest.approx(-(2 * 0.5 + 0.25))
    assert out[7].item() == pytest.approx(-(1 * 0.5 + 0.25))
    assert out[1].item() == 0.0  # prompt tokens are not "generated"
    # Negative values reward repetition.
    seq = seq_with([1], [3, 3], frequency_penalty=-1.0)
    assert apply_logits_processors(torch.zeros(1, 8), [seq], ())[0, 3].item() == 2.0


def test_logit_bias_is_added_and_bans_win_over_it():
    logits = torch.zeros(1, 8)
    seq = seq_with([1], [], logit_bias={3: 100.0, 4: -7.5, 6: 100.0}, bad_token_ids=(6,))
    out = apply_logits_processors(logits, [seq], ())[0]
    assert out[3].item() == 100.0 and out[4].item() == -7.5
    assert out[6].item() == -math.inf


def test_bans_min_tokens_bad_ids_and_bad_sequences():
    def banned(seq: Sequence) -> set[int]:
        row = apply_logits_processors(torch.zeros(1, 16), [seq], (TINY_EOS,))[0]
        return set(torch.nonzero(row == -math.inf).flatten().tolist())

    assert banned(seq_with([1], [9], bad_token_ids=(4, 5))) == {4, 5}
    # EOS and stop tokens only until min_tokens are out; ignore_eos leaves EOS alone.
    assert banned(seq_with([1], [9], min_tokens=2, stop_token_ids=(7,))) == {7, TINY_EOS}
    assert banned(seq_with([1], [9, 9], min_tokens=2, stop_token_ids=(7,))) == set()
    assert banned(seq_with([1], [], min_tokens=1, ignore_eos=True)) == set()
    # A sequence's last token only when the output ends with the rest; one-token
    # sequences always; the prompt does not count as output.
    bad = ((10, 11, 12), (13,))
    assert banned(seq_with([1], [3, 10, 11], bad_sequences=bad)) == {12, 13}
    assert banned(seq_with([1], [10, 11, 3], bad_sequences=bad)) == {13}
    assert banned(seq_with([10, 11], [], bad_sequences=bad)) == {13}


def reference_row(row: torch.Tensor, seq: Sequence, eos: tuple[int, ...]) -> torch.Tensor:
    """The processors' rules, written out one row and one token at a time."""
    row = row.clone()
    p = seq.params
    output = seq.token_ids[seq.num_prompt_tokens :]
    if p.repetition_penalty != 1.0:
        for t in set(seq.token_ids):
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t, n in Counter(output).items():
        row[t] -= p.frequency_penalty * n + p.presence_penalty
    for t, b in p.logit_bias.items():
        row[t] += b
    banned = set(p.bad_token_ids)
    if len(output) < p.min_tokens:
        banned |= set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
    for bad in p.bad_sequences:
        if len(bad) == 1 or (
            len(output) >= len(bad) - 1 and output[len(output) - len(bad) + 1 :] == list(bad[:-1])
        ):
            banned.add(bad[-1])
    for t in banned:
        row[t] = -math.inf
    return row


def mixed_batch(size: int, vocab: int = VOCAB) -> list[Sequence]:
    rng = random.Random(7)
    seqs = []
    for i in range(size):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        output = [rng.randrange(20) for _ in range(rng.randrange(0, 30))]
        params = SamplingParams(
            repetition_penalty=1.3 if i % 3 == 0 else 1.0,
            frequency_penalty=0.7 if i % 4 == 0 else 0.0,
            presence_penalty=-0.4 if i % 5 == 0 else 0.0,
            logit_bias={rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(i % 2 * 3)},
            bad_token_ids=tuple(rng.randrange(vocab) for _ in range(2)) if i % 6 == 0 else (),
            bad_sequences=((output[-1], 9), (5, 6, 7), (11,)) if i % 7 == 0 and output else (),
            min_tokens=40 if i % 8 == 0 else 0,
            stop_token_ids=(17,) if i % 8 == 0 else (),
            temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
            top_k=[-1, 5, 50][i % 3],
            seed=i if i % 2 else None,
        )
        seqs.append(Sequence(f"r{i}", prompt, params, token_ids=prompt + output))
    return seqs


class OpCounter(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "__name__", "").startswith("__"):  # len(), .shape: not work
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_processor_work(monkeypatch, run) -> dict[str, tuple[int, int]]:
    """Run `run()` with every processor wrapped; name -> (calls, torch ops inside them)."""
    seen: dict[str, list[int]] = {}
    wrapped = []
    for processor in logits_processors.LOGITS_PROCESSORS:
        processor = getattr(processor, "__wrapped__", processor)  # counted before: unwrap

        def counting(logits, batch, _inner=processor):
            tally = seen.setdefault(_inner.__name__, [0, 0])
            tally[0] += 1
            with OpCounter() as counter:
                result = _inner(logits, batch)
            tally[1] += counter.ops
            return result

        counting.__wrapped__ = processor
        wrapped.append(counting)
    monkeypatch.setattr(logits_processors, "LOGITS_PROCESSORS", wrapped)
    run()
    return {name: (calls, ops) for name, (calls, ops) in seen.items()}


def test_a_64_row_mixed_batch_is_one_batched_pass_per_processor(monkeypatch):
    seqs = mixed_batch(64)
    logits = torch.randn(64, VOCAB)
    expected = torch.stack([reference_row(logits[i], s, (TINY_EOS,)) for i, s in enumerate(seqs)])
    out = {}
    work64 = count_processor_work(
        monkeypatch,
        lambda: out.update(x=apply_logits_processors(logits.clone(), seqs, (TINY_EOS,))),
    )
    torch.testing.assert_close(out["x"], expected)
    assert all(calls == 1 for calls, _ in work64.values()), work64
    # The same tensor-op count for 8 rows as for 64: no processor works row by row.
    work8 = count_processor_work(
        monkeypatch,
        lambda: apply_logits_processors(logits[:8].clone(), mixed_batch(8), (TINY_EOS,)),
    )
    assert work8 == work64
    for name in (
        "apply_repetition_penalty",
        "apply_frequency_presence_penalties",
        "apply_logit_bias",
        "apply_bans",
    ):
        assert work64[name][1] > 0, f"{name} did no work"


def test_engine_step_over_64_requests_calls_each_processor_once(monkeypatch, model_dir):
    engine = make_engine(model_dir)
    batch = mixed_batch(64)
    for i, seq in enumerate(batch):
        params = dataclasses.replace(
            seq.params, max_tokens=4, min_tokens=min(seq.params.min_tokens, 2)
        )
        engine.add_request(f"q{i}", seq.prompt_token_ids, params)
    steps = []

    def run() -> None:
        while engine.has_work():
            if engine.step():
                steps.append(1)

    work = count_processor_work(monkeypatch, run)
    assert all(calls == len(steps) for calls, _ in work.values()), (work, len(steps))


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


# -- end to end through ChatService ------------------------------------------------


def token_strings(response) -> list[str]:
    return [entry["token"] for entry in response["choices"][0]["logprobs"]["content"]]


def test_logit_bias_plus_100_forces_its_token_and_unknown_ids_are_400(service):
    hello = service.tokenizer.convert_tokens_to_ids("▁Hello")
    forced = call(service, body(logit_bias={str(hello): 100}, max_tokens=4, temperature=1.0))
    assert content(forced).split() == ["Hello"] * 4
    greedy = call(service, body(max_tokens=1, logprobs=True))
    first = greedy["choices"][0]["logprobs"]["content"][0]["token"]
    first_id = service.tokenizer.convert_tokens_to_ids(first)
    pushed = call(service, body(max_tokens=1, logprobs=True, logit_bias={str(first_id): -100}))
    assert token_strings(pushed)[0] != first
    with pytest.raises(HTTPException) as raised:
        call(service, body(logit_bias={"40000": 5}))
    assert raised.value.status_code == 400 and raised.value.detail["param"] == "logit_bias.40000"


def test_bad_phrases_are_never_produced(service):
    plain = content(call(service, body(max_tokens=24, presence_penalty=2.0, ignore_eos=True)))
    word = next(w for w in plain.split() if len(w) >= 4 and w.isalpha())
    banned = content(
        call(service, body(max_tokens=24, presence_penalty=2.0, ignore_eos=True, bad=[word]))
    )
    assert word not in banned.split() and banned != plain
    # Sampled at length, with every tokenization of several phrases banned.
    phrases = [word, "the", "Hello world"]
    forms = bad_word_sequences(service.tokenizer, phrases)
    assert len(forms) >= 2 * len(phrases)
    with recorded_tokens(service) as produced:
        ids = [
            call(
                service, body(max_tokens=64, temperature=1.2, seed=s, ignore_eos=True, bad=phrases)
            )["id"]
            for s in range(3)
        ]
    for rid in ids:
        assert len(produced[rid]) == 64
        assert not any(contains_run(produced[rid], form) for form in forms)


def test_penalties_change_greedy_output(service):
    plain = token_strings(call(service, body(max_tokens=24, logprobs=True, ignore_eos=True)))
    for field in ("frequency_penalty", "presence_penalty"):
        penalized = token_strings(
            call(service, body(max_tokens=24, logprobs=True, ignore_eos=True, **{field: 2.0}))
        )
        assert len(set(penalized)) > len(set(plain)), field
    repeated = token_strings(
        call(service, body(max_tokens=24, logprobs=True, ignore_eos=True, repetition_penalty=2.0))
    )
    assert len(set(repeated)) > len(set(plain))
    # The prompt counts for repetition_penalty: the greedy loop on the prompt's
    # last token ([/INST]) is gone at once.
    assert plain[0] == "[/INST]" and repeated[0] != "[/INST]"


def test_min_tokens_and_ignore_eos_hold_back_the_end(service):
    eos_first = {str(EOS): 100}
    assert call(service, body(logit_bias=eos_first))["usage"]["completion_tokens"] == 1
    held = call(service, body(logit_bias=eos_first, min_tokens=5))
    assert held["usage"]["completion_tokens"] == 6
    assert held["choices"][0]["finish_reason"] == "stop"
    ignored = call(service, body(logit_bias=eos_first, ignore_eos=True, max_tokens=7))
    assert ignored["usage"]["completion_tokens"] == 7
    assert ignored["choices"][0]["finish_reason"] == "length"


def test_stop_token_and_stop_string_name_the_stop_reason(service):
    hello = service.tokenizer.convert_tokens_to_ids("▁Hello")
    forced = body(logit_bias={str(hello): 100}, max_tokens=8)
    by_token = call(service, {**forced, "stop_token_ids": [hello]})
    assert by_token["choices"][0]["stop_reason"] == hello
    assert by_token["choices"][0]["finish_reason"] == "stop" and content(by_token) == ""
    included = call(
        service, {**forced, "stop_token_ids": [hello], "include_stop_str_in_output": True}
    )
    assert content(included).strip() == "Hello"
    by_string = call(service, {**forced, "stop": ["lo H"]})
    assert content(by_string) == "Hel" and by_string["choices"][0]["stop_reason"] == "lo H"
    with_string = call(service, {**forced, "stop": ["lo H"], "include_stop_str_in_output": True})
    assert content(with_string) == "Hello H"
    assert with_string["choices"][0]["stop_reason"] == "lo H"


def test_seed_reproduces_through_the_api(service):
    sampled = body(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = content(call(service, {**sampled, "seed": 11}))
    assert content(call(service, {**sampled, "seed": 11})) == a
    assert content(call(service, {**sampled, "seed": 12})) != a


def test_logprobs_in_openai_format_with_bytes(service):
    out = call(service, body(temperature=1.0, seed=3, max_tokens=10, logprobs=True, top_logprobs=3))
    entries = out["choices"][0]["logprobs"]["content"]
    assert len(entries) == out["usage"]["completion_tokens"]
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert len(entry["top_logprobs"]) == 3
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True) and entry["logprob"] <= values[0] + 1e-6
    without_top = call(service, body(max_tokens=3, logprobs=True))
    assert all(e["top_logprobs"] == [] for e in without_top["choices"][0]["logprobs"]["content"])
    assert call(service, body(max_tokens=3))["choices"][0]["logprobs"] is None
    with pytest.raises(HTTPException):
        call(service, body(logprobs=True, top_logprobs=21))


def test_length_penalty_and_early_stopping_are_validated_and_change_nothing(service):
    plain = call(service, body(max_tokens=10, presence_penalty=1.0))
    tuned = call(
        service, body(max_tokens=10, presence_penalty=1.0, length_penalty=2.5, early_stopping=True)
    )
    assert content(tuned) == content(plain)
    with pytest.raises(HTTPException):
        call(service, body(length_penalty="long"))


def test_special_tokens_in_the_text(service):
    inst = {"3": 100}  # [INST]
    assert content(call(service, body(logit_bias=inst, max_tokens=3))) == ""
    kept = content(call(service, body(logit_bias=inst, max_tokens=3, skip_special_tokens=False)))
    assert kept.count("[INST]") == 3
    tight = content(
        call(
            service,
            body(
                logit_bias=inst,
                max_tokens=3,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            ),
        )
    )
    assert tight == "[INST][INST][INST]" and kept != tight


def test_continuous_usage_stats_put_running_usage_on_every_chunk(service):
    events = call(
        service,
        body(
            stream=True,
            max_tokens=6,
            ignore_eos=True,
            stream_options={"continuous_usage_stats": True},
        ),
    )
    chunks = [e for e in events if isinstance(e, dict)]
    assert all("usage" in c for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert done == sorted(done) and done[-1] == 6
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    quiet = call(
        service,
        body(
            stream=True,
            max_tokens=6,
            ignore_eos=True,
            stream_options={"continuous_usage_stats": False},
        ),
    )
    assert all("usage" not in e for e in quiet[:-2] if isinstance(e, dict))
    assert streamed_content(quiet) == streamed_content(events)


def test_user_is_logged_with_the_request_id_and_never_echoed(service, caplog):
    with caplog.at_level(logging.INFO, logger="flashserve.requests"):
        out = call(service, body(user="user-8472", max_tokens=2))
    records = [r for r in caplog.records if getattr(r, "user", None) == "user-8472"]
    assert records and records[0].request_id == out["id"]
    assert "user-8472" not in repr(out)


def test_repetition_penalty_defaults_to_the_models_generation_config():
    def penalty(**fields) -> float:
        request = ChatRequest.model_validate({"model": "m", "messages": [], **fields})
        defaults = ModelDefaults.from_generation_config({"repetition_penalty": 1.1})
        return to_sampling_params(
            request, defaults, prompt_len=4, max_model_len=64, vocab_size=10
        ).repetition_penalty

    assert penalty() == 1.1
    assert penalty(repetition_penalty=1.0) == 1.0
