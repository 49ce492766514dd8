"""The engine's linear product, y = x W^T (+ b): on the CPU in fp32 through a compiled
kernel (packed_gemm: any row count, the same bits per row at every count), in bf16
through oneDNN with the weight packed once (onednn_linear), else torch's F.linear
(every other device and dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashserve.layers import onednn_linear, packed_gemm


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = None
    if x.dtype == torch.float32:
        out = packed_gemm.linear(x, weight, bias)
    elif x.dtype == torch.bfloat16:
        out = onednn_linear.linear(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out
