"""The interface between the engine and a model implementation.

The engine (runner, CUDA graphs, loader) talks to a model only through
`CausalLM`: its forward pass over a flat batch, its logits, the KV cache it
needs (`kv_cache_spec`), its attention backend, and how checkpoint tensor
names map onto its parameters (`weight_rules`, plus each parameter's
`weight_loader`, layers/linear.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from flashserve.layers.attention import AttentionBackend, AttentionMetadata
from flashserve.models.kv_cache_spec import KVCache, KVCacheSpec
from flashserve.models.model_config import ModelConfig


@dataclass(frozen=True)
class WeightRule:
    """Checkpoint names in which `pattern` matches fill the parameter named by
    replacing the match with `target` (an re template), at the shard
    `shard(match)` returns (None: the whole parameter)."""

    pattern: str
    target: str
    shard: Callable[[re.Match[str]], Any] = field(default=lambda match: None)
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.pattern))  # frozen dataclass


def named_shard(group: int) -> Callable[[re.Match[str]], Any]:
    """The shard is the name a group of the pattern captured ("q", "gate", ...)."""
    return lambda match: match.group(group)


_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


class CausalLM(nn.Module):
    # Tried in order; the first match renames a checkpoint tensor. A name no rule
    # matches is the parameter's own name.
    weight_rules: ClassVar[tuple[WeightRule, ...]] = ()
    # Checkpoint tensors the engine has no use for (matched with re.search).
    ignored_weights: ClassVar[tuple[str, ...]] = (r"rotary_emb\.inv_freq$",)

    config: ModelConfig
    attention_backend: AttentionBackend

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        raise NotImplementedError

    @property
    def decode_graph_problem(self) -> str | None:
        """Why decode steps of this model cannot be captured as CUDA graphs (None: they can)."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] for a flat batch of T tokens."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor, native: bool = False) -> torch.Tensor:
        """fp32 logits of hidden [T, hidden]; native: in the model's dtype as the output
        projection gives them (the CPU sampler reads those without a widened copy)."""
        raise NotImplementedError

    def checkpoint_target(self, name: str) -> tuple[str, Any] | None:
        """(parameter name, shard) a checkpoint tensor fills, or None to skip it."""
        local = name.removeprefix("model.")
        if any(re.search(pattern, local) for pattern in self.ignored_weights):
            return None
        if self.config.tie_word_embeddings and local == "lm_head.weight":
            return None
        layer = _LAYER_INDEX.match(local)
        if layer and int(layer.group(1)) >= self.config.num_layers:
            # Layers past the decoder's (GLM-4.5's and DeepSeek-V3's multi-token
            # prediction layer) are not part of the model served here.
            return None
        for rule in self.weight_rules:
            match = rule.compiled.search(local)
            if match:
                target = local[: match.start()] + match.expand(rule.target) + local[match.end() :]
                return target, rule.shard(match)
        return local, None

    def init_buffers(self, device: torch.device) -> None:
        """Compute non-persistent buffers (rope tables) after the parameters were allocated empty."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers(device)
