"""Ranks 1..N-1 of a tensor-parallel engine: worker processes that follow rank 0.

Rank 0 (the Truss process, distributed/rank_zero.py) starts them with torch.multiprocessing
(spawn: CUDA cannot be forked). A worker joins the process group, loads its
shard of the weights, reports over its pipe, then agrees with rank 0 on the KV
cache (block count, graphs) and loops: receive a step's inputs (broadcast),
run the model on its shard (joining the collectives), repeat until rank 0
broadcasts shutdown.

Lifetimes. Workers are daemonic (multiprocessing terminates them when the
parent exits normally) and also watch the parent's pid, exiting when it is
gone (killed, crashed): no orphan keeps a GPU. Rank 0 watches the workers
(`RankGroup.failure`): when one exits unexpectedly it kills the rest, so any
collective rank 0 is blocked in fails at once instead of waiting out the
process group's timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashserve.config import EngineConfig
from flashserve.distributed.parallel_state import (
    Rendezvous,
    destroy_tensor_parallel,
    init_tensor_parallel,
    tensor_parallel,
)
from flashserve.engine.host_memory import retain_freed_host_memory
from flashserve.engine.kv_sizing import block_size_for, kv_block_count
from flashserve.engine.model_runner import ModelRunner
from flashserve.engine.step_inputs import receive_step
from flashserve.layers.attention import select_backend
from flashserve.models.loader import load_model
from flashserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)

# How often a worker checks its parent and rank 0 checks its workers.
WATCH_INTERVAL_S = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its rank (picklable: it crosses `spawn`)."""

    rank: int
    rendezvous: Rendezvous
    model_dir: str
    config: EngineConfig
    dtype: torch.dtype
    device_type: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    parent_pid: int
    timeout_s: float
    cpu_threads: int


def device_for_rank(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def smallest_over_ranks(value: int) -> int:
    """Every rank: the smallest of the ranks' values (e.g. KV blocks each can hold)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=tensor_parallel().control_group)
    return int(tensor.item())


def share_from_first(values: list[int] | None, count: int) -> list[int]:
    """Every rank: rank 0's `values` (`count` integers; other ranks pass None)."""
    tensor = torch.tensor(values if values is not None else [0] * count, dtype=torch.int64)
    dist.broadcast(tensor, src=0, group=tensor_parallel().control_group)
    return [int(v) for v in tensor.tolist()]


def all_ranks_succeeded(ok: bool) -> bool:
    """Every rank: whether `ok` held on all of them (e.g. every rank captured its graphs)."""
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=tensor_parallel().control_group)
    return bool(flag.item())


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)  # the engine is gone; nothing to flush
            time.sleep(WATCH_INTERVAL_S)

    threading.Thread(target=watch, name="flashserve-parent-watch", daemon=True).start()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process's entry point (rank spec.rank)."""
    _watch_parent(spec.parent_pid)
    logging.basicConfig(level=logging.INFO, format=f"[tp rank {spec.rank}] %(message)s")
    config = spec.config
    device = device_for_rank(spec.device_type, spec.rank - spec.rendezvous.first_rank)
    try:
        if device.type == "cpu":
            torch.set_num_threads(spec.cpu_threads)
            retain_freed_host_memory()
        else:
            torch.cuda.set_device(device)
        init_tensor_parallel(spec.rank, spec.rendezvous, device, spec.timeout_s)
        mc = ModelConfig.from_pretrained(spec.model_dir)
        backend = select_backend(config.attention_backend, device, spec.dtype, config.block_size)
        model = load_model(spec.model_dir, mc, backend, spec.dtype, device, spec.max_model_len)
    except BaseException as exc:  # noqa: BLE001 - rank 0 reports it as the load error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("loaded", None))
    try:
        block_size = block_size_for(config.block_size, backend)
        num_blocks = smallest_over_ranks(
            kv_block_count(model, device, config, block_size, spec.dtype)
        )
        max_model_len, graph_max_batch = share_from_first(None, 2)
        runner = ModelRunner(
            model, device, num_blocks, block_size, spec.dtype, spec.eos_token_ids, max_model_len
        )
        if graph_max_batch:
            captured = runner.enable_decode_graphs(graph_max_batch)
            if not all_ranks_succeeded(captured):
                runner.graphs = None
        follow(runner)
    finally:
        destroy_tensor_parallel()


def follow(runner: ModelRunner) -> None:
    """Run rank 0's steps until it says to stop."""
    while True:
        inputs = receive_step()
        if inputs is None:
            return
        runner.follow(inputs)


class RankGroup:
    """Rank 0's handle on the worker processes (ranks 1..N-1 of this node)."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = mp.get_context("spawn")
        self.processes: list[mp.Process] = []
        self.pipes: list[Connection] = []
        self.failure: str | None = None
        self._closing = False
        for spec in specs:
            ours, theirs = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=worker_main,
                args=(spec, theirs),
                name=f"flashserve-tp-rank-{spec.rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        self._ranks = [spec.rank for spec in specs]
        self._watcher = threading.Thread(
            target=self._watch, name="flashserve-tp-watch", daemon=True
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def wait_loaded(self, timeout_s: float) -> None:
        """Until every worker has loaded its shard; a worker's load error is raised here."""
        deadline = time.monotonic() + timeout_s
        for rank, process, pipe in zip(self._ranks, self.processes, self.pipes):
            while not pipe.poll(WATCH_INTERVAL_S):
                if not process.is_alive():
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} exited (code {process.exitcode}) "
                        "while loading"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel rank {rank} did not load in {timeout_s} s")
            status, message = pipe.recv()
            if status == "error":
                raise ValueError(f"tensor-parallel rank {rank}: {message}")
        self._watcher.start()

    def _watch(self) -> None:
        while not self._closing:
            for rank, process in zip(self._ranks, self.processes):
                if not process.is_alive() and not self._closing:
                    self.failure = (
                        f"tensor-parallel rank {rank} (pid {process.pid}) exited "
                        f"with code {process.exitcode}"
                    )
                    logger.error("%s; stopping the other ranks", self.failure)
                    self.kill()
                    return
            time.sleep(WATCH_INTERVAL_S)

    def close(self, grace_s: float = 5.0) -> None:
        """After rank 0 broadcast shutdown: wait for the workers, kill stragglers."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        self._closing = True
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(5)


def worker_specs(
    where: Rendezvous,
    local_ranks: range,
    model_dir: str | Path,
    config: EngineConfig,
    dtype: torch.dtype,
    device_type: str,
    max_model_len: int,
    eos_token_ids: tuple[int, ...],
    timeout_s: float,
    cpu_threads: int,
) -> list[WorkerSpec]:
    """Specs for this node's `local_ranks` (0 is its first rank), each watching this process:
    range(1, local_size) from rank 0's process, all of them on nodes > 0."""
    return [
        WorkerSpec(
            rank=where.first_rank + i,
            rendezvous=where,
            model_dir=str(model_dir),
            config=config,
            dtype=dtype,
            device_type=device_type,
            max_model_len=max_model_len,
            eos_token_ids=tuple(eos_token_ids),
            parent_pid=os.getpid(),
            timeout_s=timeout_s,
            cpu_threads=cpu_threads,
        )
        for i in local_ranks
    ]
