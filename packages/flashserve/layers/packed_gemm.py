"""Linear layers of many rows on the CPU (a prefill's projections): csrc/packed_gemm.c.

A blocked GEMM whose inner kernel keeps a 6 x 16 output tile in registers
(bench/packed_gemm.py compares it with torch's CPU GEMM). Every output is
one chain of multiply-adds in k order, so a row's bits do not depend on the batch.
"""

from __future__ import annotations

import os

import torch

from flashserve.layers.native import LINEAR_KERNEL_ARGS, NativeLibrary, linear_product

KERNELS = NativeLibrary(
    "packed_gemm.c",
    "CPU linear layers of many rows",
    {
        "packed_linear_f32": LINEAR_KERNEL_ARGS,
    },
)

# Benchmarks and tests switch the kernel off to compare with torch.
enabled = os.environ.get("FLASHSERVE_CPU_PACKED_GEMM", "1") != "0"


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """x W^T (+ bias) for a 2-D fp32 CPU x with unit column stride; None: not taken."""
    if not (
        enabled
        and x.dim() == 2
        and x.shape[0] > 0
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and x.shape[1] == weight.shape[1] > 0
        and weight.is_contiguous()
        and x.stride(1) == 1
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
        and (bias is None or bias.is_contiguous())
        and not torch.is_grad_enabled()
    ):
        return None
    library = KERNELS.load()
    if library is None:
        return None
    return linear_product(library.packed_linear_f32, x, weight, bias, "CPU linear")
