"""Linear layers of a few rows on the CPU (layers/csrc/skinny_gemm.c via layers/skinny_gemm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashserve.layers import skinny_gemm


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    if skinny_gemm.KERNELS.load() is None:
        pytest.fail(
            f"the kernel does not build here ({skinny_gemm.KERNELS.load_failed}); "
            "a C compiler is part of the dev setup"
        )


def _weights(features: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(features, k, generator=gen), torch.randn(features, generator=gen)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 16, 64])
@pytest.mark.parametrize("k", [96, 1104])  # 1104: blocks of 512, 512 and 80 columns
def test_equals_the_product_in_double_precision(rows, k):
    weight, bias = _weights(200, k)
    x = torch.randn(rows, k)
    with torch.inference_mode():
        got = skinny_gemm.linear(x, weight, bias)
    want = (x.double() @ weight.double().T + bias.double()).float()
    torch.testing.assert_close(got, want, atol=1e-4 * (k / 96) ** 0.5, rtol=1e-5)


# blocks of 3 and 6 leave 1 or 2 over; 200 features: two chunks of 96 and a rest (k split)
@pytest.mark.parametrize(("features", "k"), [(64, 128), (40, 128), (104, 128), (200, 1104)])
def test_a_row_has_the_same_bits_alone_in_a_batch_and_with_any_thread_count(features, k):
    weight, _ = _weights(features, k, seed=1)
    x = torch.randn(11, k)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        together = skinny_gemm.linear(x, weight)
        try:
            torch.set_num_threads(1)
            one_thread = skinny_gemm.linear(x, weight)
        finally:
            torch.set_num_threads(threads)
        # Every run of 1-5 rows, at every place in the batch: each block shape the kernel has.
        for size in range(1, 6):
            for start in range(0, 12 - size):
                part = skinny_gemm.linear(x[start : start + size], weight)
                assert torch.equal(part, together[start : start + size]), (size, start)
    assert torch.equal(together, one_thread)


def test_rows_of_a_wider_tensor_are_read_where_they_lie():
    weight, _ = _weights(24, 32, seed=2)
    wide = torch.randn(5, 80)
    view = wide[:, 16:48]  # row stride 80
    with torch.inference_mode():
        got = skinny_gemm.linear(view, weight)
    torch.testing.assert_close(got, F.linear(view.contiguous(), weight), atol=1e-5, rtol=1e-5)


def test_what_the_kernel_does_not_take_is_left_to_the_caller(monkeypatch):
    calls = []
    library = skinny_gemm.KERNELS.load()

    class Counting:
        def linear_f32(self, *args):
            calls.append(args[2])
            return library.linear_f32(*args)

    monkeypatch.setattr(skinny_gemm.KERNELS, "load", lambda: Counting())
    weight, _ = _weights(16, 32)
    with torch.inference_mode():
        assert skinny_gemm.linear(torch.randn(3, 32), weight) is not None
        not_taken = [
            skinny_gemm.linear(torch.randn(skinny_gemm.MAX_ROWS + 1, 32), weight),  # a prefill
            skinny_gemm.linear(torch.randn(3, 32).bfloat16(), weight.bfloat16()),
            skinny_gemm.linear(torch.randn(3, 20), torch.randn(16, 20)),  # k not a multiple of 8
            skinny_gemm.linear(torch.randn(2, 3, 32), weight),  # not 2-D
        ]
    not_taken.append(skinny_gemm.linear(torch.randn(3, 32), weight))  # autograd on
    assert calls == [3]
    assert not_taken == [None] * 5
