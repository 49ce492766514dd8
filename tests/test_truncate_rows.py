"""csrc/truncate_rows.c: kept_probs's min-p, top-k and nucleus in one compiled pass per
row, against the torch passes it replaces (truncation._truncate_probs) and against the
rule itself (a descending sort, sums in float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from flashserve.engine import truncation
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.truncation import kept_probs, truncate_logits

pytestmark = pytest.mark.skipif(
    truncation.TRUNCATE_KERNEL.load() is None, reason="no C compiler: the torch path runs"
)


def _both(logits, params, monkeypatch):
    top_p = [p.top_p for p in params]
    with monkeypatch.context() as m:
        m.setattr(truncation, "truncate_kernel_enabled", False)
        reference = kept_probs(logits, params, top_p)
    return kept_probs(logits, params, top_p), reference


def _rule(probs: torch.Tensor, params: SamplingParams):
    """The rule in float64 on one row of softmax: the kept mask (ties at the cut-off:
    the first in vocabulary order) and how close the running mass passes the target."""
    probs = probs.clone()
    if params.min_p > 0:
        floor = probs.max() * torch.tensor(params.min_p, dtype=torch.float32)
        probs[probs < floor] = 0
    # A stable descending sort: equal probabilities stay in vocabulary order.
    order = torch.sort(probs, descending=True, stable=True).indices
    ranked = probs[order].double()
    keep = ranked > 0
    keep[0] = True
    k = params.top_k
    if 0 < k < ranked.numel():
        keep[k:] = False
        ranked[k:] = 0
    slack = 1.0
    if params.top_p < 1.0:
        before = ranked.cumsum(0) - ranked
        target = params.top_p * ranked.sum()
        inside = before < target
        inside[0] = True
        n = int(inside.sum())
        slack = min(float(target - before[n - 1]), float(before[min(n, len(before) - 1)] - target))
        keep &= inside
    kept = torch.zeros_like(keep)
    kept[order] = keep & (probs[order] > 0)
    return kept, slack


def _logits(kind: str, vocab: int, g: torch.Generator) -> torch.Tensor:
    if kind == "flat":
        return torch.randn(vocab, generator=g) * 0.3
    if kind == "peaked":
        return torch.randn(vocab, generator=g) * 4.0
    if kind == "llm":  # a few likely tokens over a long tail
        row = torch.randn(vocab, generator=g) * 2.0
        row[torch.randint(vocab, (8,), generator=g)] += 12.0
        return row
    if kind == "ties":  # logits on a coarse grid: many equal probabilities
        return (torch.randn(vocab, generator=g) * 2.0).round()
    if kind == "plateau":  # one run of equal tokens that straddles every cut-off
        row = torch.randn(vocab, generator=g) * 3.0 - 10.0
        row[torch.randperm(vocab, generator=g)[:50]] = 4.0
        return row
    raise ValueError(kind)


KINDS = ("flat", "peaked", "llm", "ties", "plateau")


@pytest.mark.parametrize("vocab", [1000, 32768, 4099])
def test_the_kernel_keeps_what_the_torch_passes_and_the_rule_keep(monkeypatch, vocab):
    g = torch.Generator().manual_seed(vocab)
    rows, params = [], []
    for kind, k, tp, mp in itertools.product(
        KINDS, (1, 5, -1, vocab), (0.1, 0.95, 1.0), (0.0, 0.1)
    ):
        for _ in range(2):
            rows.append(_logits(kind, vocab, g))
            params.append(SamplingParams(temperature=1.0, top_p=tp, top_k=k, min_p=mp))
    logits = torch.stack(rows)
    ours, torch_path = _both(logits, params, monkeypatch)
    probs = torch.softmax(logits, dim=-1)
    near = 0
    for row, p in enumerate(params):
        kept, slack = _rule(probs[row], p)
        mass = float(probs[row].double().sum())
        # Values untouched where kept: the kernel only zeroes.
        assert torch.equal(ours[row][ours[row] > 0], probs[row][ours[row] > 0]), (row, p)
        # The kernel's masses are float64 sums: the rule's set unless the running mass
        # passes within float64 rounding of the target.
        if slack > 1e-12 * mass:
            assert torch.equal(ours[row] > 0, kept), (row, p)
        else:
            assert abs(int((ours[row] > 0).sum()) - int(kept.sum())) <= 1, (row, p)
        # The torch passes sum in float32 (bincount): the same set unless the running
        # mass passes within float32 rounding of the target, then a token apart.
        if slack > 1e-5 * mass:
            assert torch.equal(ours[row], torch_path[row]), (row, p)
        else:
            near += 1
            assert abs(int((ours[row] > 0).sum()) - int((torch_path[row] > 0).sum())) <= 1
    assert near < len(params) // 10


def test_the_kernel_agrees_with_truncate_logits(monkeypatch):
    """Up to ties at the cut-off, which a sort orders arbitrarily."""
    vocab = 32768
    g = torch.Generator().manual_seed(3)
    params = [
        SamplingParams(temperature=1.0, top_p=tp, top_k=k, min_p=mp)
        for tp, k, mp in itertools.product((0.5, 0.95), (-1, 40), (0.0, 0.05))
    ]
    logits = torch.stack([_logits("llm", vocab, g) for _ in params])
    ours = kept_probs(logits, params, [p.top_p for p in params])
    reference = truncate_logits(logits, params, [p.top_p for p in params], "cpu") > float("-inf")
    for row in range(len(params)):
        differ = (ours[row] > 0) ^ reference[row]
        boundary = ours[row][ours[row] > 0].min()
        probs = torch.softmax(logits[row], dim=-1)
        assert bool((probs[differ] == boundary).all()), row


def test_ties_at_the_cut_off_keep_the_first_in_vocabulary_order(monkeypatch):
    vocab = 1001
    logits = torch.full((vocab,), -20.0)
    tied = torch.tensor([7, 100, 500, 999, 1000])
    logits[tied] = 0.0
    logits[3] = 1.0
    for k, tp, keep in (
        (3, 1.0, [3, 7, 100]),
        (-1, 0.4, [3, 7]),
        (-1, 0.7, [3, 7, 100, 500]),
        (4, 0.99, [3, 7, 100, 500]),
    ):
        params = [SamplingParams(temperature=1.0, top_p=tp, top_k=k)]
        ours, torch_path = _both(logits[None], params, monkeypatch)
        assert (ours[0] > 0).nonzero().view(-1).tolist() == keep, (k, tp)
        assert torch.equal(ours, torch_path)


def test_a_row_with_every_token_banned_stays_zero(monkeypatch):
    logits = torch.full((3, 777), float("-inf"))
    logits[1] = torch.randn(777)
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=5, min_p=0.1),
        SamplingParams(temperature=1.0, top_p=0.9, top_k=5, min_p=0.1),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    ours, torch_path = _both(logits, params, monkeypatch)
    assert torch.equal(ours, torch_path)
    assert not ours[0].any() and not ours[2].any() and int((ours[1] > 0).sum()) <= 5


def test_a_row_does_not_depend_on_the_batch_or_the_threads():
    vocab = 32768
    g = torch.Generator().manual_seed(5)
    logits = torch.stack([_logits(kind, vocab, g) for kind in KINDS * 3])
    params = [SamplingParams(temperature=1.0, top_p=0.95, top_k=[-1, 50][i % 2]) for i in range(15)]
    top_p = [p.top_p for p in params]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = kept_probs(logits, params, top_p)
        torch.set_num_threads(1)
        for row in range(len(params)):
            alone = kept_probs(logits[row : row + 1], params[row : row + 1], top_p[row : row + 1])
            assert torch.equal(alone[0], batch[row])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("top_p", "keep"),
    [
        (0.75, [0, 1]),  # the mass before token 2 is exactly the target: it goes
        (0.7500001, [0, 1, 2]),  # a hair more: token 2 crosses, and stays
        (0.875, [0, 1, 2]),
        (0.9, [0, 1, 2, 3]),  # the first of two equal tokens crosses
        (0.9375, [0, 1, 2, 3]),
        (0.94, [0, 1, 2, 3, 4]),
    ],
)
def test_a_target_exactly_at_a_running_mass_ends_the_nucleus_as_the_rule_does(top_p, keep):
    """Probabilities whose sums are exact in any order: kernel, torch passes and the rule
    agree to the token where the target equals a running mass."""
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625] + [0.0] * 11])
    params = [SamplingParams(temperature=1.0, top_p=top_p)]
    ours = probs.clone()
    assert truncation._truncate_in_kernel(ours, params, [top_p])
    torch_path = probs.clone()
    work = torch.empty_like(probs.view(torch.int32))
    truncation._truncate_probs(torch_path, params, [top_p], work)
    assert (ours[0] > 0).nonzero().view(-1).tolist() == keep
    assert torch.equal(ours, torch_path)
    assert _rule(probs[0], params[0])[0].nonzero().view(-1).tolist() == keep
