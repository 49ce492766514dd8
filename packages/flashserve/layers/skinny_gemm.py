"""Linear layers of a few rows on the CPU: csrc/skinny_gemm.c.

A decode step at a small batch, or a speculative verification of k + 1
positions, multiplies a handful of rows by each weight matrix. torch's CPU
linear runs one matrix-vector product per row below ~5 rows and a BLAS GEMM
that packs the weights above, so 5 rows cost about 4 times one row although
the weights, read once, are the whole cost. The kernel reads each weight row
once and multiplies it by every input row while it sits in registers. Its
arithmetic per row is fixed (it does not depend on the other rows or the
thread count), so a verification's logits are a decode's, bit for bit.
"""

from __future__ import annotations

import ctypes
import os

import torch

from flashserve.layers.native import LINEAR_KERNEL_ARGS, NativeLibrary, linear_product

# Products of up to this many rows go to the kernel (bench/skinny_linear.py measures
# where torch's GEMM catches up).
MAX_ROWS = 64
LANES = 8

KERNELS = NativeLibrary(
    "skinny_gemm.c",
    "CPU linear layers of few rows",
    {
        "linear_f32": LINEAR_KERNEL_ARGS,
        "expert_mlp_f32": [
            ctypes.c_void_p,  # rows [n, hidden], sorted by expert
            ctypes.c_void_p,  # offsets int64 [experts + 1]
            ctypes.c_int64,  # experts
            ctypes.c_void_p,  # gate_up [experts, 2I, hidden]
            ctypes.c_void_p,  # down [experts, hidden, I]
            ctypes.c_void_p,  # scratch [n, 2I]
            ctypes.c_void_p,  # out [n, hidden]
            ctypes.c_int64,  # hidden
            ctypes.c_int64,  # I
            ctypes.c_int,  # threads
        ],
    },
)

# Benchmarks and tests switch the kernel off to compare with torch.
enabled = os.environ.get("FLASHSERVE_CPU_SKINNY_GEMM", "1") != "0"


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x W^T (+ bias) where the kernel takes x (2-D, few rows, CPU, fp32); None: not taken."""
    if (
        enabled
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[1] == weight.shape[1]
        and weight.shape[1] % LANES == 0
        and weight.shape[0] % LANES == 0
        and weight.is_contiguous()
        and x.stride(1) == 1
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
        and (bias is None or bias.is_contiguous())
        and not torch.is_grad_enabled()
    ):
        library = KERNELS.load()
        if library is not None:
            return linear_product(library.linear_f32, x, weight, bias, "CPU linear")
    return None
