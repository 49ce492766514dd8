"""An engine's start-up, before it takes a request: the settings decided before any
weight is read (device, CPU threads, dtype, context length, attention backend, block
size), the other tensor-parallel ranks started, the model loaded, the KV cache sized,
the decode graphs captured; the warm-up step once the engine is built. Each phase is
timed (`startup_seconds`) and logged as it ends.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flashserve.config import EngineConfig
from flashserve.distributed.rank_zero import RankZero
from flashserve.distributed.workers import (
    all_ranks_succeeded,
    share_from_first,
    smallest_over_ranks,
)
from flashserve.engine.dtype_choice import pick_dtype
from flashserve.engine.host_memory import retain_freed_host_memory
from flashserve.engine.kv_sizing import block_size_for, kv_block_count
from flashserve.engine.model_runner import ModelRunner
from flashserve.layers.attention import select_backend
from flashserve.models.base import CausalLM
from flashserve.models.loader import load_model
from flashserve.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What the start-up hands the engine."""

    device: torch.device
    cpu_threads: int
    model_config: ModelConfig
    dtype: torch.dtype
    # The context length: config and model, lowered to a sliding window or the KV cache.
    max_model_len: int
    attention_backend: str
    block_size: int
    eos_token_ids: tuple[int, ...]
    # Ranks 1..N-1 (tensor parallel): worker processes following this one.
    ranks: RankZero | None
    model: CausalLM
    runner: ModelRunner
    num_blocks: int
    # Seconds per start-up phase, in order.
    startup_seconds: dict[str, float]


def load_engine_model(
    config: EngineConfig,
    model_dir: str | Path,
    eos_token_ids: tuple[int, ...],
    tensor_parallel_size: int,
) -> LoadedModel:
    """Decide the settings, start the other ranks, load the model and size its KV cache.
    On a failure after the ranks started they are abandoned before the error is raised."""
    device = _pick_device(config.device)
    config.check_parallel()
    # CPU threads per rank: the cores shared among the ranks unless set.
    cpu_threads = config.cpu_threads or max(1, (os.cpu_count() or 1) // tensor_parallel_size)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads)
        retain_freed_host_memory()
    mc = ModelConfig.from_pretrained(model_dir)
    dtype = pick_dtype(config.dtype, device, mc.hidden_size, mc.intermediate_size)
    max_model_len = _context_length(config, mc)
    backend = select_backend(config.attention_backend, device, dtype, config.block_size)
    block_size = block_size_for(config.block_size, backend)
    startup_seconds: dict[str, float] = {}
    started = time.monotonic()
    eos_token_ids = tuple(eos_token_ids) or mc.eos_token_ids
    ranks = None
    if tensor_parallel_size > 1:
        ranks = RankZero.start(
            tensor_parallel_size,
            config,
            model_dir,
            mc,
            backend,
            dtype,
            device,
            max_model_len,
            eos_token_ids,
            cpu_threads,
        )
        device = ranks.device
    try:
        model = load_model(model_dir, mc, backend, dtype, device, max_model_len)
        if ranks is not None:
            ranks.wait_loaded(config.tensor_parallel_load_timeout_s)
        _sync(device)
        placed = sum(p.numel() * p.element_size() for p in model.parameters())
        seconds = _phase_done(startup_seconds, "weights placed", started)
        logger.info(
            "startup: weights placed in %.1f s: %.2f GB of %s weights on %s (%.2f GB/s)",
            seconds,
            placed / 1e9,
            dtype,
            device,
            placed / 1e9 / max(seconds, 1e-6),
        )
        started = time.monotonic()
        num_blocks = kv_block_count(model, device, config, block_size, dtype)
        if ranks is not None:
            num_blocks = smallest_over_ranks(num_blocks)
        if num_blocks * block_size < max_model_len:
            logger.warning(
                "KV cache holds %d tokens; lowering max_model_len from %d",
                num_blocks * block_size,
                max_model_len,
            )
            max_model_len = num_blocks * block_size
        runner = ModelRunner(
            model, device, num_blocks, block_size, dtype, eos_token_ids, max_model_len
        )
        per_block = ModelRunner.bytes_per_block(model, block_size, dtype)
        spec = model.kv_cache_spec
        logger.info(
            "startup: KV cache sized in %.1f s: %d blocks x %d tokens = %d tokens, %.2f GiB; "
            "%d KV bytes per token (%s per layer x %d layers)",
            _phase_done(startup_seconds, "KV cache sized", started),
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * per_block / (1 << 30),
            per_block // block_size,
            spec.token_layout(dtype),
            spec.num_layers,
        )
        loaded = LoadedModel(
            device,
            cpu_threads,
            mc,
            dtype,
            max_model_len,
            backend.name,
            block_size,
            eos_token_ids,
            ranks,
            model,
            runner,
            num_blocks,
            startup_seconds,
        )
        _capture_decode_graphs(loaded, config)
    except BaseException:
        if ranks is not None:
            ranks.abandon()
        raise
    return loaded


def _capture_decode_graphs(loaded: LoadedModel, config: EngineConfig) -> None:
    """Decode steps as CUDA graphs where the device and the model allow them."""
    use_graphs = config.cuda_graphs and loaded.device.type == "cuda"
    graph_problem = loaded.model.decode_graph_problem if use_graphs else None
    capture = graph_problem is None and use_graphs
    graph_batch = min(config.cuda_graph_max_batch, config.max_num_seqs) if capture else 0
    if loaded.ranks is not None:
        # Every rank captures the same graphs (their collectives are inside).
        share_from_first([loaded.max_model_len, graph_batch], 2)
    if graph_problem is not None:
        logger.info("cuda_graphs: off, decode steps run eagerly: %s", graph_problem)
    elif use_graphs:
        started = time.monotonic()
        runner = loaded.runner
        captured = runner.enable_decode_graphs(graph_batch)
        if loaded.ranks is not None and not all_ranks_succeeded(captured):
            captured, runner.graphs = False, None
        graphs = runner.graphs
        logger.info(
            "startup: CUDA graphs %s in %.1f s (%d graphs, %.0f MiB)",
            "captured" if captured else "FAILED, decode runs eagerly",
            _phase_done(loaded.startup_seconds, "CUDA graphs captured", started),
            len(graphs.keys) if captured and graphs is not None else 0,
            graphs.capture_bytes / (1 << 20) if captured and graphs is not None else 0,
        )
    elif config.cuda_graphs:
        logger.info("cuda_graphs: ignored on %s; decode steps run eagerly", loaded.device.type)


def finish_startup(loaded: LoadedModel, config: EngineConfig) -> None:
    """The warm-up step (config.warmup), once the decode graphs exist so that its decode
    step replays one; then the engine-ready line."""
    if config.warmup:
        started = time.monotonic()
        done = loaded.runner.warm_up(config.max_num_seqs, config.max_num_batched_tokens)
        _phase_done(loaded.startup_seconds, "warm-up", started)
        logger.info(
            "startup: warm-up: prefill step of %d tokens (%d sequences), decode step of "
            "%d rows (context %d), in %.2f s",
            done.prefill_tokens,
            done.prefill_seqs,
            done.decode_rows,
            done.decode_context,
            done.seconds,
        )
    logger.info(
        "engine ready: %s on %s (%s), attention=%s, %d KV blocks x %d tokens, max_model_len=%d",
        loaded.model_config.architecture,
        loaded.device,
        loaded.dtype,
        loaded.attention_backend,
        loaded.num_blocks,
        loaded.block_size,
        loaded.max_model_len,
    )


def _context_length(config: EngineConfig, mc: ModelConfig) -> int:
    max_model_len = min(
        config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
    )
    if mc.sliding_window is not None and mc.sliding_window < max_model_len:
        # Paged attention here always reads the whole context; within the
        # window that is exactly what sliding-window attention computes.
        logger.warning(
            "%s attends over a sliding window of %d tokens: max_model_len lowered from %d to %d",
            mc.architecture,
            mc.sliding_window,
            max_model_len,
            mc.sliding_window,
        )
        return mc.sliding_window
    return max_model_len


def _phase_done(startup_seconds: dict[str, float], phase: str, started: float) -> float:
    seconds = time.monotonic() - started
    startup_seconds[phase] = seconds
    return seconds


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    # Copies to a GPU are asynchronous: a phase ends when the device has finished it.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
