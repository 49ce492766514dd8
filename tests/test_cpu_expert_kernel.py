"""The compiled CPU kernel for routed experts' short runs (layers/csrc/expert_mlp.c)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from flashserve.layers import native
from flashserve.layers.moe import StackedExperts, cpu_expert_kernel


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    if cpu_expert_kernel.KERNELS.load() is None:
        pytest.fail(
            f"the kernel does not build here ({cpu_expert_kernel.KERNELS.load_failed}); "
            "a C compiler is part of the dev setup"
        )


def _experts(seed: int, count: int, hidden: int, size: int) -> StackedExperts:
    gen = torch.Generator().manual_seed(seed)
    experts = StackedExperts(count, hidden, size)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen))
    return experts


def _products_one_expert_at_a_time(experts, rows, counts) -> torch.Tensor:
    out, start = [], 0
    for expert, count in enumerate(counts):
        chunk = rows[start : start + count].double()
        gate, up = (chunk @ experts.gate_up_proj[expert].double().T).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ experts.down_proj[expert].double().T)
        start += count
    return torch.cat(out).float()


@pytest.mark.parametrize("counts", [[1, 0, 0, 2], [3, 5, 0, 7], [32, 1, 2, 4], [0, 0, 6, 0]])
def test_each_run_gets_its_experts_swiglu(counts):
    experts = _experts(1, 4, 24, 16)
    rows = torch.randn(sum(counts), 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = cpu_expert_kernel.expert_mlp(rows, counts, experts.gate_up_proj, experts.down_proj)
        want = _products_one_expert_at_a_time(experts, rows, counts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_a_row_gets_the_same_bits_alone_in_a_batch_and_with_other_thread_counts():
    experts = _experts(3, 3, 32, 24)
    rows = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    counts = [7, 11, 2]
    args = (experts.gate_up_proj, experts.down_proj)
    threads = torch.get_num_threads()
    with torch.no_grad():
        together = cpu_expert_kernel.expert_mlp(rows, counts, *args)
        try:
            torch.set_num_threads(1)
            one_thread = cpu_expert_kernel.expert_mlp(rows, counts, *args)
        finally:
            torch.set_num_threads(threads)
        # Row 9 is expert 1's third row; alone it is a run of one.
        alone = cpu_expert_kernel.expert_mlp(rows[9:10], [0, 1, 0], *args)
    assert torch.equal(together, one_thread)
    assert torch.equal(together[9], alone[0])


def test_what_the_kernel_does_not_take_goes_to_the_torch_paths():
    experts = _experts(5, 2, 24, 16)
    rows = torch.randn(3, 24)
    with torch.no_grad():
        long_run = [cpu_expert_kernel.MAX_RUN + 1, 0]
        assert (
            cpu_expert_kernel.expert_mlp(
                torch.randn(sum(long_run), 24), long_run, experts.gate_up_proj, experts.down_proj
            )
            is None
        )
        half = experts.to(torch.bfloat16)
        assert cpu_expert_kernel.expert_mlp(rows, [2, 1], half.gate_up_proj, half.down_proj) is None
    odd = _experts(5, 2, 20, 16)
    assert "multiples of 8" in cpu_expert_kernel.unsupported(rows, odd.gate_up_proj, odd.down_proj)


def test_without_a_compiler_experts_still_compute_and_the_log_says_why(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setattr(cpu_expert_kernel, "KERNELS", cpu_expert_kernel.KERNELS.fresh())
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("FLASHSERVE_KERNEL_CACHE", str(tmp_path))
    experts = _experts(6, 4, 24, 16)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        experts.init_buffers(torch.device("cpu"))
    assert "no C compiler" in caplog.text and "compiled kernel not used" in experts.path_reason
    x = torch.randn(5, 24)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    weights = torch.rand(5, 2)
    with torch.no_grad():
        got = experts(x, weights, ids)
    order = torch.argsort(ids.reshape(-1), stable=True)
    counts = torch.bincount(ids.reshape(-1), minlength=4).tolist()
    rows = _products_one_expert_at_a_time(experts, x[order // 2], counts)
    want = torch.zeros(5, 24).index_add_(0, order // 2, rows * weights.reshape(-1)[order, None])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
