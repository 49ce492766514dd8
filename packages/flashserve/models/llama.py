"""The Llama family (Llama, Mistral, Qwen2, Qwen3) and the parts MoE models share with it.

Projections are packed (q|k|v and gate|up) so a layer runs four matrix
products instead of seven; `weight_rules` send the checkpoint's separate
tensors to their shards of the packed weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flashserve.distributed.parallel_state import tensor_parallel
from flashserve.layers.attention import AttentionBackend, AttentionMetadata
from flashserve.layers.embedding import LMHead, VocabEmbedding, vocab_logits
from flashserve.layers.linear import PackedLinear, RowParallelLinear, split_evenly
from flashserve.layers.mlp import MLP
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RotaryEmbedding
from flashserve.models.base import CausalLM, WeightRule, named_shard
from flashserve.models.kv_cache_spec import KVCache, KVCacheSpec
from flashserve.models.model_config import ModelConfig

# Separate q/k/v and gate/up tensors -> their shards of the packed projections.
PACKED_PROJECTION_RULES = (
    WeightRule(r"\.(q|k|v)_proj\.(weight|bias)$", r".qkv_proj.\2", named_shard(1)),
    WeightRule(r"\.(gate|up)_proj\.(weight|bias)$", r".gate_up_proj.\2", named_shard(1)),
)


def local_kv_heads(num_kv_heads: int) -> tuple[int, int]:
    """(first KV head, count) this rank holds: an equal part when tensor_parallel_size
    divides the KV heads, else one head replicated over tp / num_kv_heads ranks."""
    tp = tensor_parallel()
    if num_kv_heads % tp.size == 0:
        return split_evenly(num_kv_heads, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads ({num_kv_heads}) and tensor_parallel_size {tp.size}: "
            "neither divides the other, so the KV heads can be neither split nor replicated"
        )
    return tp.rank // (tp.size // num_kv_heads), 1


class Attention(nn.Module):
    """Grouped-query attention with rope, optional q/k/v bias and per-head q/k RMSNorm.

    Tensor parallel: each rank holds num_heads / tp query heads and their KV
    heads (q|k|v column-parallel, o row-parallel); the rank's KV cache holds
    only its KV heads.
    """

    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend
    ) -> None:
        super().__init__()
        head_dim = cfg.head_dim
        first_head, num_heads = split_evenly(cfg.num_heads, "num_attention_heads")
        first_kv, num_kv = local_kv_heads(cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv, head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv * head_dim
        kv_range = (first_kv * head_dim, self.kv_size)
        self.qkv_proj = PackedLinear(
            cfg.hidden_size,
            {
                "q": cfg.num_heads * head_dim,
                "k": cfg.num_kv_heads * head_dim,
                "v": cfg.num_kv_heads * head_dim,
            },
            bias=cfg.qkv_bias,
            ranges={"q": (first_head * head_dim, self.q_size), "k": kv_range, "v": kv_range},
        )
        self.o_proj = RowParallelLinear(
            cfg.num_heads * head_dim, cfg.hidden_size, bias=cfg.o_bias, what="num_attention_heads"
        )
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
        q, k = self.rotary.rotate_in_place(positions, q, k)
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

    def forward(self, positions, hidden, residual, k_cache, v_cache, meta):
        """(this layer's output, the residual stream before it): the next layer (or the
        final norm) adds them while it normalises, in one pass. residual None: hidden is
        the stream itself (the first layer)."""
        residual, normed = self.input_layernorm.add_and_norm(hidden, residual)
        attended = self.self_attn(positions, normed, k_cache, v_cache, meta)
        residual, normed = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual


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
        self.num_local_kv_heads = local_kv_heads(cfg.num_kv_heads)[1]
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary, backend, make_mlp(i)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.hidden_size)

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        cfg = self.config
        # This rank's KV heads (all of them without tensor parallel).
        return KVCacheSpec(self.num_local_kv_heads, cfg.head_dim, tuple(range(cfg.num_layers)))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, k_cache, v_cache, meta)
        return self.norm.add_and_norm(hidden, residual)[1]

    def compute_logits(self, hidden: torch.Tensor, native: bool = False) -> torch.Tensor:
        table = self.embed_tokens if self.lm_head is None else self.lm_head
        return vocab_logits(hidden, table, native)


class LlamaForCausalLM(DecoderOnlyLM):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__(
            cfg,
            backend,
            max_positions,
            lambda _layer: MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias),
        )
