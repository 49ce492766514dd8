"""The Llama family (Llama, Mistral, Qwen2, Qwen3) and the parts MoE models share with it.

Projections are packed (q|k|v and gate|up) so a layer runs four matrix
products instead of seven; `weight_rules` send the checkpoint's separate
tensors to their shards of the packed weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.layers.attention import AttentionBackend, AttentionMetadata
from flashserve.layers.embedding import VocabEmbedding
from flashserve.layers.linear import PackedLinear
from flashserve.layers.mlp import MLP
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RotaryEmbedding
from flashserve.models.base import CausalLM, WeightRule, named_shard
from flashserve.models.kv_cache_spec import KVCache, KVCacheSpec
from flashserve.models.model_config import ModelConfig

# Separate q/k/v and gate/up tensors -> their shards of the packed projections.
PACKED_PROJECTION_RULES = (
    WeightRule(r"\.(q|k|v)_proj\.(weight|bias)$", r".qkv_proj.\2", named_shard(1)),
    WeightRule(r"\.(gate|up)_proj\.weight$", r".gate_up_proj.weight", named_shard(1)),
)


class Attention(nn.Module):
    """Grouped-query attention with rope, optional q/k/v bias and per-head q/k RMSNorm."""

    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = PackedLinear(
            cfg.hidden_size,
            {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
            bias=cfg.qkv_bias,
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary
        self.backend = backend
        self.scale = cfg.head_dim**-0.5

    def forward(self, positions, hidden, k_cache, v_cache, meta: AttentionMetadata):
        q, k, v = self.qkv_proj.split(hidden)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward blocks with residuals; `mlp` is any [T, H] -> [T, H]."""

    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        mlp: nn.Module,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, rotary, backend)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, k_cache, v_cache, meta):
        hidden = hidden + self.self_attn(
            positions, self.input_layernorm(hidden), k_cache, v_cache, meta
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DecoderOnlyLM(CausalLM):
    """Embedding, a stack of `DecoderLayer`s (every one with standard KV), final norm, lm_head.

    Subclasses choose each layer's feed-forward block (`make_mlp`) and the rope
    settings; the Llama family uses a dense MLP everywhere.
    """

    weight_rules = PACKED_PROJECTION_RULES

    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        max_positions: int,
        make_mlp: Callable[[int], nn.Module],
        rope: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend = backend
        rotary = RotaryEmbedding(
            cfg.rope if rope is None else rope,
            cfg.head_dim,
            max(max_positions, cfg.max_position_embeddings),
        )
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary, backend, make_mlp(i)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        cfg = self.config
        return KVCacheSpec(cfg.num_kv_heads, cfg.head_dim, tuple(range(cfg.num_layers)))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, k_cache, v_cache, meta)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()


class LlamaForCausalLM(DecoderOnlyLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__(
            cfg,
            backend,
            max_positions,
            lambda _layer: MLP(cfg.hidden_size, cfg.intermediate_size),
        )
