"""Routers: token hidden states -> (the experts each token uses, their weights).

Both return `weights` float32 [T, top_k] and `expert_ids` int64 [T, top_k].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts, keep the top k, optionally renormalised to sum to 1.

    Mixtral always renormalises; Qwen-MoE configs say so with `norm_topk_prob`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in 1..num_experts ({num_experts})")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, expert_ids


class GroupedSigmoidRouter(nn.Module):
    """Sigmoid scores, group-limited top-k chosen with a bias, scaled weights (GLM-4.5, DeepSeek-V3).

    Experts form `num_groups` equal groups; a group's score is the sum of its
    two best biased scores, and only experts of the `topk_groups` best groups
    can be chosen. `e_score_correction_bias` (learned load balancing) shifts
    the choice but not the weights, which are the unbiased sigmoid scores
    (renormalised if `renormalize`) times `routed_scaling_factor`. The router
    weight and the bias stay fp32 whatever the model's dtype, as the
    reference keeps them: the choice is sensitive to small score differences.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        num_groups: int,
        topk_groups: int,
        renormalize: bool,
        routed_scaling_factor: float,
    ) -> None:
        super().__init__()
        if num_experts % num_groups:
            raise ValueError(f"{num_experts} experts do not split into {num_groups} groups")
        if not 0 < topk_groups <= num_groups:
            raise ValueError(f"topk_group {topk_groups} must be in 1..n_group ({num_groups})")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(
                f"top_k {top_k} exceeds the experts of topk_group ({topk_groups}) groups"
            )
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.renormalize = renormalize
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight).sigmoid()
        biased = scores + self.e_score_correction_bias
        if self.topk_groups < self.num_groups:
            per_group = biased.view(-1, self.num_groups, self.num_experts // self.num_groups)
            # A group of one expert has no second best: its score is the one.
            best = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
            groups = torch.topk(best, self.topk_groups, dim=-1, sorted=False).indices
            allowed = torch.zeros_like(best, dtype=torch.bool).scatter_(1, groups, True)
            allowed = allowed.repeat_interleave(self.num_experts // self.num_groups, dim=-1)
            biased = biased.masked_fill(~allowed, float("-inf"))
        expert_ids = torch.topk(biased, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, expert_ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids
