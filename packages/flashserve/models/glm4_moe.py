"""GLM-4.5 / 4.6 (Glm4MoeForCausalLM): partial rope, q/k/v bias, optional q/k norm,
dense MLPs in the first layers, then sigmoid-routed experts with a shared expert."""

from __future__ import annotations

from torch import nn

from flashserve.layers.attention import AttentionBackend
from flashserve.layers.mlp import MLP
from flashserve.layers.moe import GroupedSigmoidRouter, SparseMoeBlock, StackedExperts
from flashserve.models.model_config import ModelConfig
from flashserve.models.moe import MoeDecoderLM


class Glm4MoeForCausalLM(MoeDecoderLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        dense_layers = int(cfg.raw.get("first_k_dense_replace", 1))
        # GLM rotates half of each head unless the config says otherwise.
        rope = {"partial_rotary_factor": 0.5, **cfg.rope}
        super().__init__(
            cfg, backend, max_positions, lambda i: self._mlp(cfg, i >= dense_layers), rope=rope
        )

    @staticmethod
    def _mlp(cfg: ModelConfig, sparse: bool) -> nn.Module:
        if not sparse:
            return MLP(cfg.hidden_size, cfg.intermediate_size)
        raw = cfg.raw
        num_experts = raw.get("n_routed_experts") or raw["num_local_experts"]
        expert_size = raw["moe_intermediate_size"]
        shared = int(raw.get("n_shared_experts") or 0)
        return SparseMoeBlock(
            GroupedSigmoidRouter(
                cfg.hidden_size,
                num_experts,
                raw["num_experts_per_tok"],
                num_groups=int(raw.get("n_group") or 1),
                topk_groups=int(raw.get("topk_group") or 1),
                renormalize=bool(raw.get("norm_topk_prob", True)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            ),
            StackedExperts(num_experts, cfg.hidden_size, expert_size),
            shared=(
                MLP(cfg.hidden_size, expert_size * shared, "shared experts' intermediate size")
                if shared
                else None
            ),
            shared_name="shared_experts",
        )
