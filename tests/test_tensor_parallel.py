"""Tensor parallel on the CPU beyond parity (tests/test_tensor_parallel_parity.py).

Speculative decoding at tensor_parallel_size 2 keeps greedy tokens; shapes
that cannot split fail at load naming what does not divide, before any
process starts; expert parallel, MLA at tp > 1 and a taken port are clear
load errors; closing the engine leaves no worker behind; the default size;
the worker specs of a node past the first.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from flashserve.config import EngineConfig, declared_gpu_count
from flashserve.distributed.parallel_state import rendezvous
from flashserve.service import with_tensor_parallel_default
from tests.engine_harness import make_engine, run_greedy
from tests.tensor_parallel_support import ONE_THREAD, two_ranks, worker_pids
from tests.tiny_models import save_tiny_llama, save_tiny_qwen3_moe


def test_speculative_decoding_at_tp2_keeps_greedy_tokens(tmp_path) -> None:
    folder = save_tiny_llama(tmp_path / "model")
    # Repetitive prompts give the n-gram proposer drafts to verify.
    prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 5 + [12]]
    single = make_engine(folder, **ONE_THREAD)
    expected = run_greedy(single, prompts, [20, 14])
    spec = dict(speculative_method="ngram", speculative_policy="always", num_speculative_tokens=3)
    split = make_engine(folder, **two_ranks(), **spec, **ONE_THREAD)
    try:
        assert run_greedy(split, prompts, [20, 14]) == expected
        assert split.speculator is not None and split.speculator.stats.draft_tokens > 0
    finally:
        split.close()


def test_closing_the_engine_leaves_no_worker(tmp_path) -> None:
    before = set(worker_pids())
    engine = make_engine(save_tiny_llama(tmp_path / "model"), **two_ranks(), **ONE_THREAD)
    workers = set(worker_pids()) - before
    assert len(workers) == 1
    engine.close()
    assert not set(worker_pids()) & workers


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48), r"num_attention_heads \(3\)"),
        (dict(intermediate_size=97), r"intermediate_size \(97\)"),
        (dict(num_attention_heads=12, num_key_value_heads=3, hidden_size=96),
         r"num_key_value_heads \(3\)"),
    ],
)  # fmt: skip
def test_shapes_that_do_not_split_fail_at_load_naming_them(tmp_path, overrides, message) -> None:
    before = set(worker_pids())
    folder = save_tiny_llama(tmp_path / "model", **overrides)
    size = 4 if "num_key_value_heads" in message else 2
    with pytest.raises(ValueError, match=message + f".*tensor_parallel_size {size}"):
        make_engine(folder, **{**two_ranks(), "tensor_parallel_size": size}, **ONE_THREAD)
    assert set(worker_pids()) == before  # refused before any worker started


def test_vocabulary_and_expert_sizes_must_divide(tmp_path) -> None:
    llama = save_tiny_llama(tmp_path / "llama", vocab_size=511)
    with pytest.raises(ValueError, match=r"vocab_size \(511\)"):
        make_engine(llama, **two_ranks(), **ONE_THREAD)
    moe = save_tiny_qwen3_moe(tmp_path / "moe", moe_intermediate_size=33)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(33\)"):
        make_engine(moe, **two_ranks(), **ONE_THREAD)


def test_latent_attention_and_expert_parallel_are_refused(tmp_path) -> None:
    from tests.deepseek_models import save_tiny_deepseek

    folder = save_tiny_deepseek(tmp_path / "deepseek", vocab_size=512)
    with pytest.raises(ValueError, match="latent attention is not tensor-parallel"):
        make_engine(folder, **two_ranks(), **ONE_THREAD)
    with pytest.raises(ValueError, match="moe_parallelism 'expert'.*not supported"):
        EngineConfig.from_dict({"moe_parallelism": "expert"})
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig.from_dict({"tensor_parallel_size": 0})


def test_a_taken_rendezvous_port_is_a_clear_load_error(tmp_path) -> None:
    folder = save_tiny_llama(tmp_path / "model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"tensor_parallel_port {port} is not free"):
            make_engine(folder, tensor_parallel_size=2, tensor_parallel_port=port, **ONE_THREAD)


def test_default_size_is_the_declared_gpu_count_on_cuda_only() -> None:
    from flashserve.serve import parse_set

    # What `python -m flashserve.serve --set tensor_parallel_size=2` passes to the engine.
    assert EngineConfig.from_dict(parse_set(["tensor_parallel_size=2"])).tensor_parallel_size == 2
    assert declared_gpu_count({"accelerator": "H100:4"}) == 4
    assert declared_gpu_count({"accelerator": "A10G"}) == 1
    assert declared_gpu_count({}) is None
    cpu = EngineConfig(device="cpu")
    assert with_tensor_parallel_default(cpu, {"accelerator": "H100:4"}).tensor_parallel_size == 1
    cuda = EngineConfig(device="cuda")
    assert with_tensor_parallel_default(cuda, {"accelerator": "H100:4"}).tensor_parallel_size == 4
    assert with_tensor_parallel_default(cuda.replace(tensor_parallel_size=2), {
        "accelerator": "H100:4"}).tensor_parallel_size == 2  # fmt: skip


def test_multi_node_rendezvous_comes_from_the_environment() -> None:
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600", "WORLD_SIZE": "16"}
    where = rendezvous(16, 29517, {**env, "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert (where.init_method, where.first_rank, where.local_size) == ("env://", 8, 8)
    assert rendezvous(2, 29517, {}).init_method == "tcp://127.0.0.1:29517"
    with pytest.raises(ValueError, match="WORLD_SIZE 16"):
        rendezvous(8, 29517, env)


def test_a_node_past_the_first_runs_all_its_ranks_as_workers(tmp_path, monkeypatch) -> None:
    from flashserve.distributed.node import node_specs

    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600", "WORLD_SIZE": "4",
           "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    specs = node_specs(EngineConfig(tensor_parallel_size=4), save_tiny_llama(tmp_path / "model"))
    assert [spec.rank for spec in specs] == [2, 3]
    assert {(s.device_type, s.dtype, s.cpu_threads, s.parent_pid) for s in specs} == {
        ("cuda", torch.bfloat16, 1, os.getpid())
    }


def test_stacked_experts_and_fused_projections_load_each_ranks_slice() -> None:
    """Checkpoints that store experts stacked [E, 2I, H] / [E, H, I] or q|k|v fused load
    rank 1's slices (loading joins no collective, so the layout alone is enough)."""
    from flashserve.distributed.parallel_state import TensorParallel, set_tensor_parallel
    from flashserve.layers.linear import PackedLinear
    from flashserve.layers.moe import StackedExperts

    experts_in = 4, 8, 6  # E, H, I
    gate_up = torch.randn(4, 12, 8)
    down = torch.randn(4, 8, 6)
    fused = torch.randn(16 + 8 + 8, 8)
    previous = set_tensor_parallel(TensorParallel(rank=1, size=2))
    try:
        experts = StackedExperts(*experts_in)
        packed = PackedLinear(
            8, {"q": 16, "k": 8, "v": 8}, bias=False, ranges={"q": (8, 8), "k": (4, 4), "v": (4, 4)}
        )
    finally:
        set_tensor_parallel(previous)
    experts.load_gate_up(experts.gate_up_proj, gate_up, None)
    experts.load_down(experts.down_proj, down, None)
    assert torch.equal(experts.gate_up_proj.data[:, :3], gate_up[:, 3:6])  # gate, rank 1
    assert torch.equal(experts.gate_up_proj.data[:, 3:], gate_up[:, 9:12])  # up, rank 1
    assert torch.equal(experts.down_proj.data, down[:, :, 3:])
    assert packed.load_shard(packed.weight, fused, None) == packed.weight.numel()
    expected = torch.cat([fused[8:16], fused[20:24], fused[28:32]])
    assert torch.equal(packed.weight.data, expected)
