"""A mixture-of-experts feed-forward block: router, routed experts, optional shared experts."""

from __future__ import annotations

import torch
from torch import nn

from flashserve.distributed.parallel_state import all_reduce, tensor_parallel
from flashserve.layers.linear import RowParallelLinear
from flashserve.layers.moe.experts import StackedExperts


class SparseMoeBlock(nn.Module):
    """out = experts(x, router(x)) [+ shared(x), gated by sigmoid(shared_gate(x)) if given].

    Module names follow the checkpoints': `gate` is the router, `experts` the
    routed experts; the shared expert's name is the caller's choice.

    Tensor parallel: the routed experts and the shared expert each give this
    rank's partial sum; they are added first and all-reduced once.
    """

    def __init__(
        self,
        gate: nn.Module,
        experts: StackedExperts,
        shared: nn.Module | None = None,
        shared_name: str = "shared_experts",
        shared_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.tp = tensor_parallel()
        self.gate = gate
        self.experts = experts
        self.shared_name = shared_name if shared is not None else None
        if shared is not None:
            self.add_module(shared_name, shared)
            down = getattr(shared, "down_proj", None)
            if isinstance(down, RowParallelLinear):
                down.reduce = False  # reduced with the routed output below
        self.shared_expert_gate = shared_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        out = self.experts(x, weights, expert_ids)
        if self.shared_name is not None:
            shared = getattr(self, self.shared_name)(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return all_reduce(out, self.tp)
