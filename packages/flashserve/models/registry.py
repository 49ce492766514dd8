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


# A switch an architecture either fixes (True / False) or reads from a config.json key,
# with the default transformers' config class gives it when the key is absent.
Switch = bool | tuple[str, bool]

ATTENTION_BIAS: Switch = ("attention_bias", False)


@dataclass(frozen=True)
class Architecture:
    module: str  # under flashserve.models
    class_name: str
    # Bias on the q/k/v projections, on o_proj, on the dense SwiGLU blocks; per-head
    # q/k RMSNorm. As transformers' modeling code for the architecture decides them
    # (Qwen2 always has a q/k/v bias and no o bias; Llama's attention_bias covers o).
    qkv_bias: Switch = False
    o_bias: Switch = False
    mlp_bias: Switch = False
    qk_norm: Switch = False


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(
        "llama",
        "LlamaForCausalLM",
        qkv_bias=ATTENTION_BIAS,
        o_bias=ATTENTION_BIAS,
        mlp_bias=("mlp_bias", False),
    ),
    "MistralForCausalLM": Architecture("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": Architecture("llama", "LlamaForCausalLM", qkv_bias=True),
    "Qwen3ForCausalLM": Architecture(
        "llama", "LlamaForCausalLM", qkv_bias=ATTENTION_BIAS, o_bias=ATTENTION_BIAS, qk_norm=True
    ),
    "Qwen2MoeForCausalLM": Architecture(
        "qwen3_moe", "Qwen2MoeForCausalLM", qkv_bias=("qkv_bias", True)
    ),
    "Qwen3MoeForCausalLM": Architecture(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        qkv_bias=ATTENTION_BIAS,
        o_bias=ATTENTION_BIAS,
        qk_norm=True,
    ),
    "MixtralForCausalLM": Architecture("mixtral", "MixtralForCausalLM"),
    "Glm4MoeForCausalLM": Architecture(
        "glm4_moe", "Glm4MoeForCausalLM", qkv_bias=ATTENTION_BIAS, qk_norm=("use_qk_norm", False)
    ),
    # Multi-head latent attention + MoE: DeepSeek-V3/R1/V3.1 and Kimi K2 checkpoints
    # (their attention_bias covers q_a, kv_a and o; the model reads it itself).
    "DeepseekV3ForCausalLM": Architecture("deepseek_v3", "DeepseekV3ForCausalLM"),
    "DeepseekV2ForCausalLM": Architecture(
        "deepseek_v3", "DeepseekV2ForCausalLM", mlp_bias=("mlp_bias", False)
    ),
}


def switch_value(switch: Switch, raw: dict) -> bool:
    """An architecture's switch for one checkpoint's config.json."""
    if isinstance(switch, bool):
        return switch
    key, default = switch
    value = raw.get(key)
    return default if value is None else bool(value)


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
