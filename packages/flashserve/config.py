"""Engine settings, read from config.yaml's `model_metadata.engine`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class EngineConfig:
    model: str = "embedded_model"
    served_model_name: str | None = None
    revision: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto | cuda | cpu
    attention_backend: str = "auto"  # auto | flash_attn | torch
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_cache_memory_fraction: float = 0.90
    kv_cache_memory_gb: float = 2.0
    block_size: int | str = "auto"
    enable_prefix_caching: bool = True
    # CUDA graphs for pure-decode steps, one per batch bucket up to cuda_graph_max_batch
    # (capped by max_num_seqs); CUDA only, ignored (with a log line) on CPU.
    cuda_graphs: bool = True
    cuda_graph_max_batch: int = 256
    # Schedule and launch step n+1 before step n's tokens reach the host, so the host's
    # work per step runs while the device computes (engine/async_scheduling.py).
    # "auto": on for CUDA; on a CPU a launch is the whole step, so it would only delay
    # outputs. Off whenever speculative decoding is on (drafts need the host's tokens).
    async_scheduling: bool | str = "auto"
    # Run one full-size prefill step and one full-size decode step at load, so the
    # first real requests do not pay a GPU's one-time costs (kernels, cuBLAS, allocator).
    # Off here because the tests build hundreds of engines; config.yaml turns it on.
    warmup: bool = False
    max_queue_size: int = 1024
    # Tokens a stream gathers before it is delivered (the first token and the last
    # always go at once). 1 streams every token as it is made; larger values trade
    # smoothness for fewer chunks, which matters when the host's CPU is the limit.
    stream_interval: int = 1
    # Longest a request may take, arrival to last token (None: no limit). A request's
    # `x-request-timeout` header (seconds) may ask for less, never for more.
    request_timeout_s: float | None = None
    # A loop turn longer than this marks the engine wedged: is_healthy() turns false.
    engine_stall_timeout_s: float | None = 300.0
    # Speculative decoding (engine/speculative/): "none" or "ngram". An n-gram draft of
    # up to num_speculative_tokens tokens is what followed the most recent earlier
    # occurrence of the sequence's last n tokens, n from ngram_max down to ngram_min.
    speculative_method: str = "none"
    num_speculative_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    # "measured": each step verifies only the drafts the measured cost model expects to
    # pay off (engine/speculative/policy.py); "always": every draft (tests, benchmarks).
    speculative_policy: str = "measured"
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"
    cpu_threads: int | None = None
    # Ranks (one device each) the model is split over: attention heads, MLP and expert
    # intermediate sizes and the vocabulary (distributed/, docs/DESIGN.md). None: on
    # CUDA the GPU count config.yaml's resources.accelerator declares (`H100:4` -> 4),
    # on a CPU 1. Ranks > 0 are worker processes the engine starts.
    tensor_parallel_size: int | None = None
    # Local rendezvous port of the ranks' process group (tcp://127.0.0.1:<port>);
    # multi-node deployments rendezvous through MASTER_ADDR/MASTER_PORT instead.
    tensor_parallel_port: int = 29517
    # How MoE experts are split: "tensor" (every rank a slice of every expert);
    # "expert" (experts spread over ranks) is refused, see docs/DESIGN.md.
    moe_parallelism: str = "tensor"
    # Longest rank 0 waits for the other ranks to load their shards.
    tensor_parallel_load_timeout_s: float = 1800.0
    # Test-only: raise inside the engine loop after this many steps (never set in production).
    fault_after_steps: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> EngineConfig:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown engine settings in model_metadata.engine: {unknown}")
        config = cls(**raw)
        config.check_speculative()
        config.check_parallel()
        return config

    def check_parallel(self) -> None:
        """Reject tensor-parallel settings that cannot work, naming the key."""
        size = self.tensor_parallel_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        port = self.tensor_parallel_port
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"tensor_parallel_port must be a port number, got {port!r}")
        if self.moe_parallelism == "expert":
            raise ValueError(
                "moe_parallelism 'expert' (experts spread over the ranks) is not supported; "
                "'tensor' splits every expert over the ranks instead"
            )
        if self.moe_parallelism != "tensor":
            raise ValueError(f"moe_parallelism must be 'tensor', got {self.moe_parallelism!r}")

    def check_speculative(self) -> None:
        """Reject speculative settings that cannot work, naming the key."""
        if self.speculative_method not in ("none", "ngram"):
            raise ValueError(
                f"speculative_method must be 'none' or 'ngram', got {self.speculative_method!r}"
            )
        if self.speculative_policy not in ("measured", "always"):
            raise ValueError(
                "speculative_policy must be 'measured' or 'always', "
                f"got {self.speculative_policy!r}"
            )
        if self.speculative_method == "none":
            return
        if int(self.num_speculative_tokens) < 1:
            raise ValueError(
                f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}"
            )
        if not 1 <= int(self.ngram_min) <= int(self.ngram_max):
            raise ValueError(
                f"need 1 <= ngram_min <= ngram_max, got ngram_min={self.ngram_min}, "
                f"ngram_max={self.ngram_max}"
            )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def declared_gpu_count(resources: dict[str, Any] | None) -> int | None:
    """GPUs config.yaml's `resources.accelerator` asks for (`H100:4` -> 4, `A10G` -> 1)."""
    accelerator = (resources or {}).get("accelerator")
    if not accelerator:
        return None
    _, _, count = str(accelerator).partition(":")
    try:
        return int(count) if count else 1
    except ValueError:
        raise ValueError(f"resources.accelerator {accelerator!r}: count is not a number") from None
