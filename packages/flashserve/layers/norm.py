"""RMSNorm as the Llama-family reference implementations compute it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.layers import cpu_elementwise


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): a pre-norm layer's residual stream and the
        next block's input, in one pass on the CPU. residual None: x is the stream (the
        first layer's input)."""
        if residual is None:
            return x, self(x)
        fused = cpu_elementwise.add_rms_norm(x, residual, self.weight, self.eps)
        if fused is not None:
            return fused
        total = x + residual
        return total, self(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = cpu_elementwise.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        # Normalise in fp32 like the reference implementations, then cast back.
        dtype = x.dtype
        x = x.float()
        if x.is_cuda:
            # The same fp32 math in one kernel instead of five (a decode step there
            # is mostly kernel launches besides its matmuls).
            x = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
