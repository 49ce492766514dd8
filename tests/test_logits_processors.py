"""Issue 3, sampling side: the logits processors (penalties, logit_bias, bans).

Checked on tensors against a row-by-row reference, and counted: a mixed batch is one
batched pass per processor, in LLMEngine as well.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
import torch

from flashserve.engine import logits_processors
from flashserve.engine.logits_processors import apply_logits_processors
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.sequence import Sequence
from tests.sampling_harness import TINY_EOS, VOCAB, make_engine, seq_with
from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), vocab_size=VOCAB)


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


def test_edits_logits_is_true_wherever_a_processor_changes_the_row():
    """The sampler reads raw logits where edits_logits is False for every row: then no
    processor may change that row. Each setting alone, and none, over outputs of several
    lengths (min_tokens holds only until it is reached)."""
    g = torch.Generator().manual_seed(0)
    settings = [
        {},
        dict(repetition_penalty=1.3),
        dict(frequency_penalty=0.5),
        dict(presence_penalty=-0.4),
        dict(logit_bias={3: 2.0}),
        dict(bad_token_ids=[4]),
        dict(bad_sequences=[(5, 6)]),
        dict(bad_sequences=[(7,)]),
        dict(min_tokens=2, stop_token_ids=[8]),
        dict(min_tokens=2),
    ]
    for setting in settings:
        for output in ([], [5], [5, 9, 9]):
            seq = seq_with([1, 3, 5], output, **setting)
            logits = torch.randn(1, VOCAB, generator=g)
            edited = apply_logits_processors(logits.clone(), [seq], (TINY_EOS,))
            if not torch.equal(edited, logits):
                assert logits_processors.edits_logits(seq), (setting, output)
    assert not logits_processors.edits_logits(seq_with([1], [], temperature=0.7, top_p=0.9))
