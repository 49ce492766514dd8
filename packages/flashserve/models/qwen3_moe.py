"""Qwen3-MoE (and Qwen2-MoE): Qwen attention with softmax top-k routed experts."""

from __future__ import annotations

from torch import nn

from flashserve.layers.attention import AttentionBackend
from flashserve.layers.mlp import MLP
from flashserve.layers.moe import SoftmaxTopKRouter, SparseMoeBlock, StackedExperts
from flashserve.models.model_config import ModelConfig
from flashserve.models.moe import MoeDecoderLM


def _num_experts(cfg: ModelConfig) -> int:
    # Hub configs say num_experts; transformers 5 writes num_local_experts.
    return int(cfg.raw.get("num_experts") or cfg.raw.get("num_local_experts") or 0)


def _sparse_layers(cfg: ModelConfig) -> set[int]:
    raw = cfg.raw
    skip = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    if not _num_experts(cfg):
        return set()
    return {i for i in range(cfg.num_layers) if i not in skip and (i + 1) % step == 0}


class Qwen3MoeForCausalLM(MoeDecoderLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        sparse = _sparse_layers(cfg)
        super().__init__(cfg, backend, max_positions, lambda i: self._mlp(cfg, i in sparse))

    @staticmethod
    def _mlp(cfg: ModelConfig, sparse: bool) -> nn.Module:
        raw = cfg.raw
        if not sparse:
            return MLP(cfg.hidden_size, cfg.intermediate_size)
        return SparseMoeBlock(
            SoftmaxTopKRouter(
                cfg.hidden_size,
                _num_experts(cfg),
                raw["num_experts_per_tok"],
                bool(raw.get("norm_topk_prob", False)),
            ),
            StackedExperts(_num_experts(cfg), cfg.hidden_size, raw["moe_intermediate_size"]),
        )


class Qwen2MoeForCausalLM(MoeDecoderLM):
    """Qwen2-MoE: as Qwen3-MoE without q/k norm, with q/k/v bias and a sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        sparse = _sparse_layers(cfg)
        super().__init__(cfg, backend, max_positions, lambda i: self._mlp(cfg, i in sparse))
        if not cfg.raw.get("shared_expert_intermediate_size"):
            # Its checkpoint still has the gate of the (empty) shared expert: a gate on zero.
            self.ignored_weights = (*self.ignored_weights, r"\.shared_expert_gate\.weight$")

    @staticmethod
    def _mlp(cfg: ModelConfig, sparse: bool) -> nn.Module:
        raw = cfg.raw
        if not sparse:
            return MLP(cfg.hidden_size, cfg.intermediate_size)
        shared_size = raw.get("shared_expert_intermediate_size") or 0
        return SparseMoeBlock(
            SoftmaxTopKRouter(
                cfg.hidden_size,
                _num_experts(cfg),
                raw["num_experts_per_tok"],
                bool(raw.get("norm_topk_prob", False)),
            ),
            StackedExperts(_num_experts(cfg), cfg.hidden_size, raw["moe_intermediate_size"]),
            shared=(
                MLP(cfg.hidden_size, shared_size, "shared_expert_intermediate_size")
                if shared_size
                else None
            ),
            shared_name="shared_expert",
            shared_gate=nn.Linear(cfg.hidden_size, 1, bias=False) if shared_size else None,
        )
