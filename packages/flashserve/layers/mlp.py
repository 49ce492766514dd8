"""The SwiGLU feed-forward block of Llama-family decoders (and of MoE models' dense layers).

Tensor parallel: gate|up column-parallel and down row-parallel over the
intermediate size, so the only collective is down's all-reduce (none with
`reduce=False`, for a shared expert summed with the routed experts first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.layers import cpu_elementwise
from flashserve.layers.linear import PackedLinear, RowParallelLinear, split_evenly

# A CPU prefill's rows go through the block this many at a time: gate|up's product
# for all of them at once outgrows the caches, and each pass over it then goes
# through memory. A row's result does not depend on its tile.
CPU_ROW_TILE = 1024


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), each projection with an optional bias."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        what: str = "intermediate_size",
        reduce: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        part = split_evenly(intermediate_size, what)
        self.gate_up_proj = PackedLinear(
            hidden_size,
            {"gate": intermediate_size, "up": intermediate_size},
            bias=bias,
            ranges={"gate": part, "up": part},
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=bias, what=what, reduce=reduce
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.shape[0] <= CPU_ROW_TILE:
            return self.down_proj(self._activated(x))
        tiles = [
            self.down_proj.partial(self._activated(x[start : start + CPU_ROW_TILE]))
            for start in range(0, x.shape[0], CPU_ROW_TILE)
        ]
        return self.down_proj.reduced(torch.cat(tiles))

    def _activated(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        activated = cpu_elementwise.silu_mul(gate_up)
        if activated is None:
            gate, up = gate_up.split(self.gate_up_proj.split_sizes, dim=-1)
            activated = F.silu(gate) * up
        return activated
