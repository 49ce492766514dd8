"""What the tensor-parallel test modules share: tiny checkpoints, two-rank settings."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import transformers

from tests.tiny_models import random_model, save_tiny_glm4_moe, save_tiny_llama, save_tiny_qwen3_moe


def save_tiny_qwen3(path: Path) -> Path:
    config = transformers.Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    random_model(config, 0, 0.3, perturb=True).save_pretrained(path)  # q/k norms not all 1
    return path


MODELS = {
    "llama": save_tiny_llama,
    # One KV head: at tp=2 each rank keeps a replica of it.
    "llama-one-kv-head": lambda path: save_tiny_llama(path, num_key_value_heads=1),
    # o_proj's and down_proj's biases (row-parallel) are added once, on rank 0.
    "llama-biases": lambda path: save_tiny_llama(path, attention_bias=True, mlp_bias=True),
    "qwen3-qk-norm": save_tiny_qwen3,
    "qwen3-moe": save_tiny_qwen3_moe,
    "glm4.5-moe": save_tiny_glm4_moe,
}
ONE_THREAD = dict(cpu_threads=1, kv_cache_memory_gb=0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_ranks() -> dict:
    """tensor_parallel_size 2 on a free port (other test runs may share the machine)."""
    return dict(tensor_parallel_size=2, tensor_parallel_port=free_port())


def worker_pids() -> list[int]:
    return [p.pid for p in psutil.Process().children(recursive=True) if p.is_running()]


def spawned_workers(server_pid: int) -> list[psutil.Process]:
    """A server's tensor-parallel worker processes (multiprocessing spawn children)."""
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.NoSuchProcess:  # gone, or a zombie (exited, not reaped): not a worker
            continue
    return workers
