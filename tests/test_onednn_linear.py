"""bf16 products on the CPU through oneDNN with the weight packed once (layers/onednn_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashserve.layers import cpu_linear, onednn_linear

needs_onednn_bf16 = pytest.mark.skipif(
    not onednn_linear.SUPPORTED, reason="this CPU's oneDNN has no bf16 products"
)


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def _weights(out_features: int, in_features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) * 0.05).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16()
    return weight, bias


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_same_bits_as_f_linear_for_any_row_count(rows: int, with_bias: bool) -> None:
    weight, bias = _weights(96, 80)
    bias = bias if with_bias else None
    x = torch.randn(rows, 80).bfloat16()
    got = onednn_linear.linear(x, weight, bias)
    assert got is not None and got.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(x, weight, bias))
    assert torch.equal(cpu_linear.linear(x, weight, bias), got)


@needs_onednn_bf16
def test_strided_and_batched_inputs() -> None:
    weight, _ = _weights(48, 64)
    wide = torch.randn(5, 128).bfloat16()
    assert torch.equal(onednn_linear.linear(wide[:, :64], weight), F.linear(wide[:, :64], weight))
    x = torch.randn(2, 3, 64).bfloat16()
    got = onednn_linear.linear(x, weight)
    assert got.shape == (2, 3, 48) and torch.equal(got, F.linear(x, weight))


@needs_onednn_bf16
def test_the_weight_is_packed_once_and_again_after_an_in_place_change() -> None:
    with torch.inference_mode(False):  # a model's parameters are made outside inference mode
        weight = torch.nn.Parameter(_weights(32, 16)[0], requires_grad=False)
    x = torch.randn(4, 16).bfloat16()
    onednn_linear.linear(x, weight)
    first = onednn_linear.packed(weight)
    assert onednn_linear.packed(weight) is first
    with torch.inference_mode(False), torch.no_grad():  # as the loader writes a checkpoint
        weight.mul_(2)
    assert onednn_linear.packed(weight) is not first
    assert torch.equal(onednn_linear.linear(x, weight), F.linear(x, weight))


def test_other_dtypes_and_autograd_keep_f_linear() -> None:
    weight, bias = _weights(8, 16)
    assert onednn_linear.linear(torch.randn(3, 16), weight.float()) is None
    assert onednn_linear.linear(torch.randn(3, 16).half(), weight.half()) is None
    assert onednn_linear.linear(torch.randn(0, 16).bfloat16(), weight) is None
    assert onednn_linear.linear(torch.randn(3, 16).bfloat16(), weight, bias.float()) is None
    with pytest.raises(RuntimeError):  # a width mismatch: F.linear says so
        cpu_linear.linear(torch.randn(3, 15).bfloat16(), weight)
