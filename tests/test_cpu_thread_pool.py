"""The CPU kernels' parallel loop (layers/csrc/thread_pool.c): every way of running a job
gives the same bits, with more threads than cores, from two callers at once, after fork."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from flashserve.layers import cpu_elementwise, native, packed_gemm
from flashserve.layers.moe import cpu_expert_kernel

MODES = {"adaptive": 0, "openmp": 1, "pool": 2}


@pytest.fixture(scope="module", autouse=True)
def kernels_build():
    for library in (cpu_expert_kernel.KERNELS, packed_gemm.KERNELS, cpu_elementwise.KERNELS):
        if library.load() is None:
            pytest.fail(f"a kernel does not build here ({library.load_failed})")


@contextlib.contextmanager
def threading_mode(mode: str, threads: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    native.thread_pool().flashserve_pool_mode(MODES[mode])
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        native.thread_pool().flashserve_pool_mode(0)


def _products() -> Callable[[], list[torch.Tensor]]:
    """Every kernel family once: few rows, many rows, the elementwise steps, experts."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(328, 264, generator=g)
    few, many = torch.randn(7, 264, generator=g), torch.randn(300, 264, generator=g)
    norm_weight = torch.randn(264, generator=g)
    gate_up = torch.randn(300, 2 * 264, generator=g)
    experts_gate_up = torch.randn(2, 2 * 48, 264, generator=g)
    experts_down = torch.randn(2, 264, 48, generator=g)

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [
                packed_gemm.linear(few, weight),
                packed_gemm.linear(many, weight),
                cpu_elementwise.rms_norm(many, norm_weight, 1e-5),
                cpu_elementwise.silu_mul(gate_up),
                cpu_expert_kernel.expert_mlp(few, [3, 4], experts_gate_up, experts_down),
            ]

    return run


@pytest.mark.parametrize("threads", [2, 7])
@pytest.mark.parametrize("mode", ["openmp", "pool", "adaptive"])
def test_every_mode_and_thread_count_gives_the_bits_of_one_thread(mode, threads):
    run = _products()
    with threading_mode("openmp", 1):
        want = run()
    for _ in range(3):  # the pool's workers start at the first job, then are reused
        with threading_mode(mode, threads):
            got = run()
        for g, w in zip(got, want):
            assert g is not None and torch.equal(g, w)


def test_two_callers_at_once_each_get_their_own_results():
    run = _products()
    with threading_mode("openmp", 1):
        want = run()
    results: list[list[torch.Tensor]] = []
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(20):
                results.append(run())
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    with threading_mode("pool", 2):
        callers = [threading.Thread(target=caller) for _ in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join(timeout=120)
    assert not errors and len(results) == 40
    for got in results:
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("parent_mode", ["pool", "openmp"])
def test_a_forked_child_runs_kernels_without_the_parents_threads(parent_mode):
    run = _products()
    with threading_mode(parent_mode, 2):
        want = run()  # the parent's workers, or OpenMP's threads, exist now
        pid = os.fork()
        if pid == 0:  # the child: a hang would be killed by the alarm
            signal.alarm(60)
            # Compared as bytes: torch's own parallel ops may hang in a child forked after
            # the parent ran OpenMP regions (libgomp is not fork-safe); the kernels' jobs
            # go to the child's own workers.
            got = run()
            ok = all(g.numpy().tobytes() == w.numpy().tobytes() for g, w in zip(got, want))
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
