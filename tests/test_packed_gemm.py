"""fp32 linear layers of any row count on the CPU (layers/csrc/packed_gemm.c via
layers/packed_gemm.py), and the engine's dispatch (layers/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashserve.layers import cpu_linear, packed_gemm


@pytest.fixture(autouse=True)
def _inference() -> None:
    with torch.inference_mode():
        yield


def test_the_kernel_builds() -> None:
    assert packed_gemm.KERNELS.load() is not None, packed_gemm.KERNELS.load_failed


@pytest.mark.parametrize(
    ("rows", "features", "k"),
    [
        (65, 48, 96),
        (100, 37, 520),
        (7, 16, 1100),
        (300, 784, 512),
        (49, 1, 3),
        (1, 200, 1104),
        (2, 75, 64),
        (3, 53, 520),
        (4, 100, 32),
    ],
)
def test_equals_the_product_in_double_precision(rows: int, features: int, k: int) -> None:
    """Edges of every block: rows past a 6-row panel or a 48-row block, features past a
    16-wide panel, k past a 512-column block; 1-4 rows, which take several panels at a
    time, with a part panel after the whole ones; with and without a bias."""
    g = torch.Generator().manual_seed(rows + features + k)
    x = torch.randn(rows, k, generator=g)
    weight = torch.randn(features, k, generator=g)
    bias = torch.randn(features, generator=g)
    expected = F.linear(x.double(), weight.double(), bias.double()).float()
    got = packed_gemm.linear(x, weight, bias)
    assert got is not None
    tolerance = {"rtol": 1e-5, "atol": 1e-4 * k**0.5}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(packed_gemm.linear(x, weight), expected - bias, **tolerance)


@pytest.mark.parametrize(("features", "k"), [(200, 1040), (40, 128), (784, 96)])
def test_a_row_has_the_same_bits_alone_in_any_batch_and_thread_count(features, k) -> None:
    """A decode row, a short or long prompt chunk, a verification: every row count and
    place in the batch (each shape of the inner kernel), one thread or several."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(203, k, generator=g)
    weight = torch.randn(features, k, generator=g)
    bias = torch.randn(features, generator=g)
    together = packed_gemm.linear(x, weight, bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = packed_gemm.linear(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, one_thread)
    runs = [(start, size) for size in range(1, 8) for start in range(0, 14 - size)]
    runs += [(5, 48), (60, 143), (0, 64), (3, 65)]
    for start, size in runs:
        part = packed_gemm.linear(x[start : start + size], weight, bias)
        assert torch.equal(part, together[start : start + size]), (start, size)


def test_the_weight_is_packed_once_and_again_after_an_in_place_change() -> None:
    g = torch.Generator().manual_seed(6)
    with torch.inference_mode(False):  # a model's weights: tensors with a version counter
        weight = torch.nn.Parameter(torch.randn(40, 64, generator=g), requires_grad=False)
    x = torch.randn(3, 64, generator=g)
    first = packed_gemm.panels(weight)
    assert packed_gemm.panels(weight) is first
    assert first.shape == (3, 64, packed_gemm.PANEL)  # 40 features: two panels and a part one
    with torch.no_grad():
        weight.mul_(2)
    assert packed_gemm.panels(weight) is not first
    torch.testing.assert_close(packed_gemm.linear(x, weight), F.linear(x, weight))


def test_a_strided_input_view() -> None:
    packed = torch.randn(90, 3 * 64)
    view = packed[:, 64:128]
    weight = torch.randn(40, 64)
    torch.testing.assert_close(
        packed_gemm.linear(view, weight), F.linear(view.contiguous(), weight)
    )


def test_the_dispatch_takes_the_kernel_for_every_fp32_row_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken = []
    original = packed_gemm.linear

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(packed_gemm, "linear", counting)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 128, generator=g)
    for rows in (1, 64, 65, 1000):
        x = torch.randn(rows, 128, generator=g)
        # Sums of 128 products of N(0, 1) values: fp32 rounding differs by ~1e-5 in order.
        torch.testing.assert_close(
            cpu_linear.linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5
        )
    x = torch.randn(100, 128, generator=g).bfloat16()  # bf16: the fp32 kernel is not asked
    assert torch.equal(cpu_linear.linear(x, weight.bfloat16()), F.linear(x, weight.bfloat16()))
    assert taken == [True] * 4


def test_mismatched_shapes_are_left_to_torch_which_raises() -> None:
    weight = torch.randn(32, 64)
    for bad in (torch.randn(100, 63), torch.randn(3, 65)):
        with pytest.raises(RuntimeError):
            cpu_linear.linear(bad, weight)
    with pytest.raises(RuntimeError):
        cpu_linear.linear(torch.randn(100, 64), weight, torch.randn(31))
