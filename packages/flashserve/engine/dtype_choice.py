"""Which float type the weights and KV cache use: the configured one, or for `auto` the faster.

GPUs run bf16 (fp16 where bf16 is missing). CPUs differ: with AVX-512 BF16 or AMX,
bf16 matrix products run 2-4x faster than fp32; without them bf16 is emulated and
slower. So on a CPU `auto` times one matrix product of the model's own MLP shape in
both types, on the engine's threads and through the engine's own linear path (the
compiled fp32 kernels where they run, layers/cpu_linear.py), and keeps the faster.
"""

from __future__ import annotations

import logging
import time

import torch

from flashserve.layers import cpu_linear

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# bf16 halves the weights' precision: take it on a CPU only for a clear gain.
MIN_BF16_SPEEDUP = 1.2
# A decode-step's worth of rows; the matrix is capped so that the timing stays ~0.1 s.
PROBE_ROWS = 64
PROBE_MAX_DIM = 2048


def pick_dtype(name: str, device: torch.device, hidden_size: int, mlp_size: int) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, not {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float32
    shape = (min(hidden_size, PROBE_MAX_DIM), min(mlp_size, PROBE_MAX_DIM))
    bf16_s = matmul_seconds(torch.bfloat16, *shape)
    fp32_s = matmul_seconds(torch.float32, *shape)
    chosen = faster_cpu_dtype(bf16_s, fp32_s)
    logger.info(
        "dtype auto on this CPU: a %dx%dx%d product takes %.2f ms in bf16, %.2f ms in fp32 -> %s",
        PROBE_ROWS,
        *shape,
        bf16_s * 1e3,
        fp32_s * 1e3,
        str(chosen).removeprefix("torch."),
    )
    return chosen


def faster_cpu_dtype(bf16_seconds: float, fp32_seconds: float) -> torch.dtype:
    """bf16 when it is at least MIN_BF16_SPEEDUP times faster than fp32, else fp32."""
    if bf16_seconds * MIN_BF16_SPEEDUP <= fp32_seconds:
        return torch.bfloat16
    return torch.float32


@torch.inference_mode()
def matmul_seconds(dtype: torch.dtype, hidden: int, out: int, repeats: int = 5) -> float:
    """Best time of one [PROBE_ROWS, hidden] x [hidden, out] product in `dtype` on the CPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, hidden, generator=generator).to(dtype)
    w = torch.randn(out, hidden, generator=generator).to(dtype)
    cpu_linear.linear(x, w)  # first call: kernel selection, packing, a kernel's build
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(4):
            cpu_linear.linear(x, w)
        best = min(best, (time.perf_counter() - started) / 4)
    return best
