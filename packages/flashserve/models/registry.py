"""Which model class serves a checkpoint: `architectures[0]` of its config.json.

Adding an architecture: a module in models/ with a `CausalLM` subclass, one
entry here, one parity test (docs/DESIGN.md, "Adding an architecture").
Model modules are imported only when a checkpoint names them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flashserve.models.base import CausalLM


class UnsupportedModelError(ValueError):
    """The checkpoint is not one of the architectures this engine implements."""


@dataclass(frozen=True)
class Architecture:
    module: str  # under flashserve.models
    class_name: str
    # Defaults of attention switches the config may not spell out (Qwen2's q/k/v
    # bias and Qwen3's q/k norm are part of the architecture, not config keys).
    qkv_bias: bool = False
    qk_norm: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": Architecture("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": Architecture("llama", "LlamaForCausalLM", qkv_bias=True),
    "Qwen3ForCausalLM": Architecture("llama", "LlamaForCausalLM", qk_norm=True),
    "Qwen2MoeForCausalLM": Architecture("qwen3_moe", "Qwen2MoeForCausalLM", qkv_bias=True),
    "Qwen3MoeForCausalLM": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True),
    "MixtralForCausalLM": Architecture("mixtral", "MixtralForCausalLM"),
    "Glm4MoeForCausalLM": Architecture("glm4_moe", "Glm4MoeForCausalLM"),
    # Multi-head latent attention + MoE: DeepSeek-V3/R1/V3.1 and Kimi K2 checkpoints.
    "DeepseekV3ForCausalLM": Architecture("deepseek_v3", "DeepseekV3ForCausalLM"),
    "DeepseekV2ForCausalLM": Architecture("deepseek_v3", "DeepseekV2ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def architecture(name: str) -> Architecture:
    entry = ARCHITECTURES.get(name)
    if entry is None:
        raise UnsupportedModelError(
            f"architecture {name!r} (config.json `architectures[0]`) is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return entry


def model_class(name: str) -> type[CausalLM]:
    entry = architecture(name)
    module = importlib.import_module(f"flashserve.models.{entry.module}")
    return getattr(module, entry.class_name)
