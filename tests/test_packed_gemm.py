"""Linear layers of many rows on the CPU (layers/csrc/packed_gemm.c via layers/packed_gemm.py),
and the engine's dispatch between the CPU kernels (layers/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashserve.layers import cpu_linear, packed_gemm, skinny_gemm


@pytest.fixture(autouse=True)
def _inference() -> None:
    with torch.inference_mode():
        yield


def test_the_kernel_builds() -> None:
    assert packed_gemm.KERNELS.load() is not None, packed_gemm.KERNELS.load_failed


@pytest.mark.parametrize(
    ("rows", "features", "k"),
    [(65, 48, 96), (100, 37, 520), (7, 16, 1100), (300, 784, 512), (49, 1, 3)],
)
def test_equals_the_product_in_double_precision(rows: int, features: int, k: int) -> None:
    """Edges of every block: rows past a 6-row panel or a 48-row block, features past a
    16-wide panel, k past a 512-column block; with and without a bias."""
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


def test_a_row_has_the_same_bits_alone_in_any_batch_and_thread_count() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(203, 1040, generator=g)
    weight = torch.randn(200, 1040, generator=g)
    together = packed_gemm.linear(x, weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = packed_gemm.linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, one_thread)
    for start, size in ((0, 1), (5, 7), (60, 143)):
        assert torch.equal(
            packed_gemm.linear(x[start : start + size], weight), together[start : start + size]
        )


def test_a_strided_input_view() -> None:
    packed = torch.randn(90, 3 * 64)
    view = packed[:, 64:128]
    weight = torch.randn(40, 64)
    torch.testing.assert_close(
        packed_gemm.linear(view, weight), F.linear(view.contiguous(), weight)
    )


def test_the_dispatch_takes_the_kernel_for_the_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = []
    for module in (skinny_gemm, packed_gemm):
        original = module.linear

        def counting(*args, _original=original, _name=module.__name__, **kwargs):
            out = _original(*args, **kwargs)
            taken.append((_name.rsplit(".", 1)[-1], out is not None))
            return out

        monkeypatch.setattr(module, "linear", counting)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 128, generator=g)
    for rows in (skinny_gemm.MAX_ROWS, skinny_gemm.MAX_ROWS + 1):
        x = torch.randn(rows, 128, generator=g)
        # Sums of 128 products of N(0, 1) values: fp32 rounding differs by ~1e-5 in order.
        torch.testing.assert_close(
            cpu_linear.linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5
        )
    x = torch.randn(100, 128, generator=g).bfloat16()  # bf16: neither fp32 kernel is asked
    assert torch.equal(cpu_linear.linear(x, weight.bfloat16()), F.linear(x, weight.bfloat16()))
    assert taken == [("skinny_gemm", True), ("skinny_gemm", False), ("packed_gemm", True)]


def test_mismatched_shapes_are_left_to_torch_which_raises() -> None:
    weight = torch.randn(32, 64)
    for bad in (torch.randn(100, 63), torch.randn(3, 65)):
        with pytest.raises(RuntimeError):
            cpu_linear.linear(bad, weight)
    with pytest.raises(RuntimeError):
        cpu_linear.linear(torch.randn(100, 64), weight, torch.randn(31))
