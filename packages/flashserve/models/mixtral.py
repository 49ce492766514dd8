"""Mixtral: Mistral attention with softmax top-k (renormalised) routed experts in every layer."""

from __future__ import annotations

from flashserve.layers.attention import AttentionBackend
from flashserve.layers.moe import SoftmaxTopKRouter, SparseMoeBlock, StackedExperts
from flashserve.models.base import WeightRule
from flashserve.models.model_config import ModelConfig
from flashserve.models.moe import MOE_WEIGHT_RULES, MoeDecoderLM

_PROJECTION = {"1": "gate", "3": "up"}

# Mixtral checkpoints name the block `block_sparse_moe` and the projections
# w1 (gate), w3 (up), w2 (down); transformers 5's stacked names are ours.
MIXTRAL_RULES = (
    WeightRule(
        r"\.block_sparse_moe\.experts\.(\d+)\.w(1|3)\.weight$",
        r".mlp.experts.gate_up_proj",
        lambda m: (int(m.group(1)), _PROJECTION[m.group(2)]),
    ),
    WeightRule(
        r"\.block_sparse_moe\.experts\.(\d+)\.w2\.weight$",
        r".mlp.experts.down_proj",
        lambda m: (int(m.group(1)), "down"),
    ),
    WeightRule(r"\.block_sparse_moe\.gate\.weight$", r".mlp.gate.weight"),
)


class MixtralForCausalLM(MoeDecoderLM):
    weight_rules = MIXTRAL_RULES + MOE_WEIGHT_RULES

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        raw = cfg.raw
        num_experts = raw["num_local_experts"]
        super().__init__(
            cfg,
            backend,
            max_positions,
            lambda _layer: SparseMoeBlock(
                SoftmaxTopKRouter(
                    cfg.hidden_size, num_experts, raw["num_experts_per_tok"], renormalize=True
                ),
                StackedExperts(
                    num_experts, cfg.hidden_size, cfg.intermediate_size, "intermediate_size"
                ),
            ),
        )
