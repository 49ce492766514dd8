"""The shape of a Llama-family checkpoint, read from its Hugging Face `config.json`.

One dataclass covers Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3: they differ only
in a few switches (q/k/v bias, per-head q/k RMSNorm, tied embeddings, rope
scaling), so the engine runs one model implementation over all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashserve.models.quantization import checkpoint_quantization
from flashserve.models.registry import UnsupportedModelError, architecture, switch_value

__all__ = ["ModelConfig", "UnsupportedModelError"]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    o_bias: bool = False
    mlp_bias: bool = False  # on the dense SwiGLU blocks (and DeepSeek-V2's shared experts)
    rope: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    # Attention reaches back this many tokens at most (None: the whole context).
    sliding_window: int | None = None
    # The whole config.json, for the keys only one architecture reads (MoE shapes).
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        entry = architecture(arch)
        # A quantization method the loader cannot dequantize fails here, before any
        # download: cast as they are, its weights would be garbage.
        checkpoint_quantization(raw)
        activation = raw.get("hidden_act") or raw.get("hidden_activation") or "silu"
        if activation not in ("silu", "swish"):
            # Every implemented feed-forward block is SwiGLU.
            raise UnsupportedModelError(
                f"{arch} with hidden_act {activation!r} is not supported (only silu)"
            )
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=switch_value(entry.qkv_bias, raw),
            qk_norm=switch_value(entry.qk_norm, raw),
            o_bias=switch_value(entry.o_bias, raw),
            mlp_bias=switch_value(entry.mlp_bias, raw),
            rope=_rope_parameters(raw),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            sliding_window=_sliding_window(raw),
            raw=dict(raw),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        with open(Path(model_dir) / "config.json") as f:
            return cls.from_dict(json.load(f))


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Normalise the two spellings of rope settings into one dict.

    Older configs carry `rope_theta` + `rope_scaling`; transformers 5 writes a
    single `rope_parameters` dict. Either way we end with `rope_type`,
    `rope_theta` and the type's own keys.
    """
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    # GLM-4.5 configs keep the rotated fraction of each head beside the rope keys.
    if "partial_rotary_factor" in raw:
        params.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    return params


def _sliding_window(raw: dict[str, Any]) -> int | None:
    # Qwen configs carry a window with `use_sliding_window: false`; Mistral and
    # Mixtral configs set the window alone when they use one.
    if not raw.get("use_sliding_window", True):
        return None
    window = raw.get("sliding_window")
    if not window:
        return None
    # Qwen's windows start at layer `max_window_layers` (transformers 5 also writes the
    # resulting `layer_types`): no layer past the last one slides.
    layer_types = raw.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    layers = raw.get("num_hidden_layers")
    first_sliding = raw.get("max_window_layers")
    if layers is not None and first_sliding is not None and first_sliding >= layers:
        return None
    return int(window)
