"""The SwiGLU feed-forward block of Llama-family decoders (and of MoE models' dense layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.layers.linear import PackedLinear


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=False
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(x)
        return self.down_proj(F.silu(gate) * up)
