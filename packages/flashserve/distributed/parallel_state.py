"""This process's place in the tensor-parallel group, and the few collectives the layers use.

One rank per device. Rank 0 is the Truss process (scheduler, sampler, KV block
bookkeeping); ranks 1..N-1 are worker processes (distributed/workers.py). Two
process groups: `device_group` carries the model's collectives (NCCL on CUDA,
gloo on the CPU); `control_group` (gloo, CPU tensors) carries the step inputs
rank 0 broadcasts, so they never pass through a device copy. On the CPU both
are the default gloo group.

The layers read `tensor_parallel()` when they are built and keep it, so a
model built outside a group (size 1) has exactly the single-device layers
and never calls a collective, even in a process that later joins a group.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(days=3650)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    device_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 1


_STATE = TensorParallel()


def tensor_parallel() -> TensorParallel:
    return _STATE


def set_tensor_parallel(state: TensorParallel) -> TensorParallel:
    """Install `state` (also used to build a model on meta as rank 0 of `size` for checks);
    returns the previous one."""
    global _STATE
    previous, _STATE = _STATE, state
    return previous


@contextlib.contextmanager
def single_device() -> Iterator[None]:
    """Build modules as without tensor parallel (a throwaway probe of a kernel's shape)."""
    previous = set_tensor_parallel(TensorParallel())
    try:
        yield
    finally:
        set_tensor_parallel(previous)


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: tcp://127.0.0.1:<port> on one node, env:// across nodes."""

    init_method: str
    world_size: int
    # Global rank of this node's first process (rank 0 on a single node), and how
    # many ranks this node runs.
    first_rank: int
    local_size: int
    port: int | None

    @property
    def multi_node(self) -> bool:
        return self.init_method == "env://"


def rendezvous(size: int, port: int, environ: dict[str, str] | None = None) -> Rendezvous:
    """The rendezvous for `size` ranks: env:// when MASTER_ADDR and WORLD_SIZE are set
    (a multi-node deployment, NODE_RANK says which node this is), else local TCP."""
    env = os.environ if environ is None else environ
    if env.get("MASTER_ADDR") and env.get("WORLD_SIZE"):
        world = int(env["WORLD_SIZE"])
        if world != size:
            raise ValueError(
                f"tensor_parallel_size {size} does not match the environment's WORLD_SIZE {world}"
            )
        if not env.get("MASTER_PORT"):
            raise ValueError("multi-node tensor parallel needs MASTER_PORT with MASTER_ADDR")
        node_rank = int(env.get("NODE_RANK", "0"))
        per_node = int(env.get("LOCAL_WORLD_SIZE") or size)
        return Rendezvous("env://", world, node_rank * per_node, per_node, None)
    return Rendezvous(f"tcp://127.0.0.1:{port}", size, 0, size, port)


def check_port_free(port: int) -> None:
    """A clear load error when the rendezvous port is taken (torch's own is a stack trace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As torch's store binds it: a closed group's port in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ValueError(
                f"tensor_parallel_port {port} is not free ({exc.strerror}); another server "
                "or tensor-parallel group uses it: set tensor_parallel_port to a free port"
            ) from None


def init_tensor_parallel(
    rank: int,
    where: Rendezvous,
    device: torch.device,
    timeout_s: float,
) -> TensorParallel:
    """Join the group as `rank` (blocks until every rank has joined) and install it."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(
            backend,
            init_method=where.init_method,
            rank=rank,
            world_size=where.world_size,
            timeout=timeout,
            **kwargs,
        )
    except RuntimeError as exc:  # DistNetworkError and friends
        if where.port is not None and "address already in use" in str(exc).lower():
            raise ValueError(
                f"tensor_parallel_port {where.port} is in use: set tensor_parallel_port "
                "to a free port"
            ) from None
        raise
    world = dist.group.WORLD
    # Its own gloo group, without a practical timeout: a worker may wait for rank 0's
    # next step as long as the server is idle. The model's collectives (WORLD) keep
    # `timeout_s`, so a rank that stops answering fails a step instead of hanging it.
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    state = TensorParallel(rank, where.world_size, world, control)
    set_tensor_parallel(state)
    return state


def destroy_tensor_parallel() -> None:
    set_tensor_parallel(TensorParallel())
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, state: TensorParallel) -> torch.Tensor:
    """Sum `x` over the ranks of `state` (the group a module was built in), in place;
    nothing at size 1."""
    if state.size > 1:
        dist.all_reduce(x, group=state.device_group)
    return x


def gather_last_dim(x: torch.Tensor, state: TensorParallel) -> torch.Tensor:
    """Rank 0: the ranks' `x` concatenated along the last dimension. Other ranks: `x`."""
    if state.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(state.size)] if state.rank == 0 else None
    dist.gather(x, parts, dst=0, group=state.device_group)
    return torch.cat(parts, dim=-1) if parts is not None else x
