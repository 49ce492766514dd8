"""DeepSeek-V2's router: softmax scores, top-k over all experts or over the best groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupLimitedSoftmaxRouter(nn.Module):
    """Softmax over all experts; `greedy` takes the top k of them, `group_limited_greedy`
    only from the `topk_groups` groups with the highest single score. Weights are the
    softmax scores (not renormalised) times `routed_scaling_factor`. Returns float32
    weights [T, k] and int64 expert ids [T, k] as the other routers do.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        method: str,
        num_groups: int,
        topk_groups: int,
        routed_scaling_factor: float,
    ) -> None:
        super().__init__()
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {method!r}: greedy or group_limited_greedy")
        if method == "group_limited_greedy" and num_experts % num_groups:
            raise ValueError(f"{num_experts} experts do not split into {num_groups} groups")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.num_experts = num_experts
        self.top_k = top_k
        self.grouped = method == "group_limited_greedy"
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight).softmax(dim=-1)
        if self.grouped:
            per_group = scores.view(-1, self.num_groups, self.num_experts // self.num_groups)
            groups = per_group.amax(dim=-1).topk(self.topk_groups, dim=-1, sorted=False).indices
            allowed = torch.zeros_like(per_group[..., 0], dtype=torch.bool).scatter_(
                1, groups, True
            )
            allowed = allowed.repeat_interleave(self.num_experts // self.num_groups, dim=-1)
            scores = scores.masked_fill(~allowed, 0.0)
        weights, expert_ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return weights * self.routed_scaling_factor, expert_ids
