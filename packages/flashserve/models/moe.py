"""What the mixture-of-experts decoders share: expert weight names, path logging, graph safety."""

from __future__ import annotations

import logging

import torch

from flashserve.layers.moe.experts import GROUPED_MM, StackedExperts
from flashserve.models.base import WeightRule
from flashserve.models.llama import PACKED_PROJECTION_RULES, DecoderOnlyLM

logger = logging.getLogger(__name__)

# Hub checkpoints store one tensor per expert and projection; transformers 5
# keeps (and may save) them stacked as experts.gate_up_proj / experts.down_proj,
# which are our parameters' own names and need no rule.
PER_EXPERT_RULES = (
    WeightRule(
        r"\.experts\.(\d+)\.(gate|up)_proj\.weight$",
        r".experts.gate_up_proj",
        lambda m: (int(m.group(1)), m.group(2)),
    ),
    WeightRule(
        r"\.experts\.(\d+)\.down_proj\.weight$",
        r".experts.down_proj",
        lambda m: (int(m.group(1)), "down"),
    ),
)
MOE_WEIGHT_RULES = PER_EXPERT_RULES + PACKED_PROJECTION_RULES


class RoutedExpertsModel:
    """Mixed into a model with routed experts: their path in the load log, graph safety."""

    def experts(self) -> list[StackedExperts]:
        return [m for m in self.modules() if isinstance(m, StackedExperts)]

    def init_buffers(self, device: torch.device) -> None:
        super().init_buffers(device)
        experts = self.experts()
        if experts:
            logger.info(
                "MoE experts (%d layers): %s path: %s",
                len(experts),
                experts[0].path,
                experts[0].path_reason,
            )

    @property
    def decode_graph_problem(self) -> str | None:
        for experts in self.experts():
            if experts.path != GROUPED_MM:
                return (
                    "MoE experts run one matrix product per active expert, from run lengths "
                    f"read on the host ({experts.path_reason})"
                )
        return None


class MoeDecoderLM(RoutedExpertsModel, DecoderOnlyLM):
    weight_rules = MOE_WEIGHT_RULES
