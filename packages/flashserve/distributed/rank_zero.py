"""Rank 0's side of a tensor-parallel engine: its place in the group and its hold on
the other ranks, from start (check the split, start the workers, join) to the end
(shutdown broadcast and join, or kill without any collective).

`LLMEngine` (engine/llm_engine.py) holds one `RankZero` when tensor_parallel_size > 1;
the workers themselves are distributed/workers.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flashserve.config import EngineConfig
from flashserve.distributed.parallel_state import (
    TensorParallel,
    check_port_free,
    destroy_tensor_parallel,
    init_tensor_parallel,
    rendezvous,
    set_tensor_parallel,
    tensor_parallel,
)
from flashserve.distributed.workers import RankGroup, worker_specs
from flashserve.engine.step_inputs import send_shutdown
from flashserve.layers.attention import AttentionBackend
from flashserve.models.loader import check_model_builds
from flashserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


class RankZero:
    """This process as rank 0 of a tensor-parallel group, with ranks 1..N-1 as workers."""

    def __init__(self, workers: RankGroup, device: torch.device) -> None:
        self.workers = workers
        # The device rank 0 runs on (cuda:0 on GPUs: rank r uses device r).
        self.device = device

    @classmethod
    def start(
        cls,
        size: int,
        config: EngineConfig,
        model_dir: str | Path,
        model_config: ModelConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        cpu_threads: int,
    ) -> RankZero:
        """Check the model splits over `size` ranks, start ranks 1..N-1 and join the
        process group as rank 0."""
        if tensor_parallel().enabled:
            raise RuntimeError(
                "a tensor-parallel engine already runs in this process (one process group "
                "per process): close it first"
            )
        if device.type == "cuda":
            present = torch.cuda.device_count()
            if size > present:
                raise ValueError(
                    f"tensor_parallel_size {size} needs {size} GPUs; this machine has {present}"
                )
            device = torch.device("cuda", 0)
        elif size > (os.cpu_count() or 1):
            logger.warning(
                "tensor_parallel_size %d on %d CPU cores: ranks share cores",
                size,
                os.cpu_count() or 1,
            )
        previous = set_tensor_parallel(TensorParallel(0, size))
        try:  # divisibility (heads, KV heads, sizes, vocabulary) before any process starts
            check_model_builds(model_config, backend, dtype, max_model_len)
        finally:
            set_tensor_parallel(previous)
        where = rendezvous(size, config.tensor_parallel_port)
        if where.first_rank != 0:
            raise ValueError(
                f"this node's first rank is {where.first_rank} (NODE_RANK is set): only node 0 "
                "serves; the other nodes run `python -m flashserve.distributed.node`"
            )
        if where.port is not None:
            check_port_free(where.port)
        timeout = config.engine_stall_timeout_s or 300.0
        workers = RankGroup(
            worker_specs(
                where,
                range(1, where.local_size),
                model_dir,
                config,
                dtype,
                device.type,
                max_model_len,
                eos_token_ids,
                timeout,
                cpu_threads,
            )
        )
        try:
            init_tensor_parallel(0, where, device, timeout)
        except BaseException:
            workers.kill()
            destroy_tensor_parallel()
            raise
        logger.info(
            "tensor parallel: %d ranks (%s, %s), workers %s",
            size,
            "nccl" if device.type == "cuda" else "gloo",
            where.init_method,
            workers.pids,
        )
        return cls(workers, device)

    @property
    def failure(self) -> str | None:
        """Why the group cannot step any more (a worker rank died), or None."""
        return self.workers.failure

    def wait_loaded(self, timeout_s: float) -> None:
        self.workers.wait_loaded(timeout_s)

    def close(self) -> None:
        """Stop the worker ranks after the engine's last step and leave the group."""
        if self.workers.failure is None:
            try:
                send_shutdown()
            except Exception:  # noqa: BLE001 - a rank already gone: kill the rest below
                logger.warning("tensor parallel: shutdown broadcast failed", exc_info=True)
            self.workers.close()
        else:
            self.workers.kill()
        destroy_tensor_parallel()

    def abandon(self) -> None:
        """Kill the worker ranks and leave the group without any collective (the engine failed)."""
        self.workers.kill()
        destroy_tensor_parallel()
