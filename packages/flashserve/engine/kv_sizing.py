"""How a rank's KV cache is sized at load: the block size for the attention backend, and
the number of blocks its memory holds after the weights (rank 0 and every worker rank)."""

from __future__ import annotations

import logging

import torch

from flashserve.config import EngineConfig
from flashserve.engine.cuda_graphs import memory_reserve as graph_memory_reserve
from flashserve.engine.device_memory import CudaMemory, kv_cache_budget, measure_free_memory
from flashserve.engine.model_runner import ModelRunner
from flashserve.layers.attention import AttentionBackend
from flashserve.models.base import CausalLM

logger = logging.getLogger(__name__)


def block_size_for(setting: int | str, backend: AttentionBackend) -> int:
    """`block_size`, with `auto` resolved for the attention backend."""
    if setting == "auto":
        return 256 if backend.name == "flash_attn" else 16
    return int(setting)


def kv_block_count(
    model: CausalLM,
    device: torch.device,
    config: EngineConfig,
    block_size: int,
    dtype: torch.dtype,
) -> int:
    """KV blocks this rank's memory holds after its weights (every rank asks; the
    tensor-parallel group takes the smallest answer)."""
    per_block = ModelRunner.bytes_per_block(model, block_size, dtype)
    if device.type == "cuda":
        free = measure_free_memory(CudaMemory(device))
        # Leave the decode graphs' memory pool room.
        use_graphs = config.cuda_graphs
        reserve = graph_memory_reserve(model.attention_backend) if use_graphs else 0
        budget = kv_cache_budget(free, config.kv_cache_memory_fraction, reserve)
        logger.info(
            "device memory after weights: %.2f GiB allocated, %.2f GiB released from "
            "the allocator cache, %.2f of %.2f GiB free; KV budget %.2f GiB",
            free.allocated / (1 << 30),
            free.released / (1 << 30),
            free.free / (1 << 30),
            free.total / (1 << 30),
            budget / (1 << 30),
        )
    else:
        budget = config.kv_cache_memory_gb * (1 << 30)
    return max(1, int(budget // per_block))
