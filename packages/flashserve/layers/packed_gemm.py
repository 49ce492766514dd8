"""Every fp32 linear layer on the CPU, of any number of rows: csrc/packed_gemm.c.

A blocked GEMM whose inner kernel keeps an output tile of up to 6 rows x 16
features in registers (bench/packed_gemm.py compares it with torch's CPU GEMM),
reading the weight as panels of 16 features packed once per weight
(weight_copies). Every output is one chain of multiply-adds in k order, so a
row's bits depend on nothing but its own input row: a position has the same
logits and keys whether it is a decode row, part of a prompt chunk of any length
or of a speculative verification, alone or in any batch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from flashserve.layers.native import LINEAR_KERNEL_ARGS, NativeLibrary, linear_product
from flashserve.layers.weight_copies import kept_copy

KERNELS = NativeLibrary(
    "packed_gemm.c",
    "CPU fp32 linear layers",
    {
        "packed_linear_f32": LINEAR_KERNEL_ARGS,
    },
)

# Output features per panel (NR in the kernel).
PANEL = 16
_ATTRIBUTE = "_fp32_panels"

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
        and x.stride(1) == 1
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
        and (bias is None or bias.is_contiguous())
        and not torch.is_grad_enabled()
    ):
        return None
    library = KERNELS.load()
    if library is None:
        return None
    layout = panels(weight)
    return linear_product(library.packed_linear_f32, x, weight, bias, "CPU linear", layout)


def panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [n, k] as [ceil(n / PANEL), k, PANEL] (features past n zero), kept on the weight."""
    return kept_copy(weight, _ATTRIBUTE, _to_panels)


def _to_panels(weight: torch.Tensor) -> torch.Tensor:
    features, k = weight.shape
    padded = F.pad(weight, (0, 0, 0, -features % PANEL))
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()
