"""DeepSeek-V3 / R1 / V3.1 and Kimi K2 (DeepseekV3ForCausalLM): multi-head latent
attention over a latent KV cache, dense MLPs in the first `first_k_dense_replace`
layers, then sigmoid-routed experts with group-limited choice, a score-correction
bias and shared experts.

Attention (layers/mla.py): q from hidden (through a low-rank q_a -> norm -> q_b when
`q_lora_rank` is set, else q_proj), split into a non-rotary part (qk_nope_head_dim)
and a rotary part (qk_rope_head_dim); one latent + rotary key per token from
kv_a_proj_with_mqa; kv_b_proj expands latents into per-head keys and values.
Checkpoints lay the rotary dims out as interleaved pairs (`rope_interleave`, the
default): they are de-interleaved before the usual rotate-half rope, the same
permutation for queries and keys, so dot products are unchanged. Yarn's
`mscale_all_dim` scales the softmax by mscale^2, as the reference does.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from flashserve.distributed.parallel_state import tensor_parallel
from flashserve.layers import cpu_linear
from flashserve.layers.attention import AttentionBackend, AttentionMetadata
from flashserve.layers.embedding import VocabEmbedding
from flashserve.layers.linear import PackedLinear
from flashserve.layers.mla import (
    LatentAttentionBackend,
    LatentAttentionOps,
    absorbed_causal_attention,
    causal_attention,
    gather_context,
    write_latent,
)
from flashserve.layers.mlp import MLP
from flashserve.layers.moe import GroupedSigmoidRouter, SparseMoeBlock, StackedExperts
from flashserve.layers.moe.softmax_group_router import GroupLimitedSoftmaxRouter
from flashserve.layers.norm import RMSNorm
from flashserve.layers.rotary import RotaryEmbedding
from flashserve.models.base import CausalLM, WeightRule, named_shard
from flashserve.models.kv_cache_spec import KVCache, LatentKVCacheSpec
from flashserve.models.model_config import ModelConfig
from flashserve.models.moe import PER_EXPERT_RULES, RoutedExpertsModel

logger = logging.getLogger(__name__)

DEEPSEEK_WEIGHT_RULES = PER_EXPERT_RULES + (
    # q_a and kv_a read the same hidden states: one product.
    WeightRule(
        r"\.self_attn\.(q_a_proj|kv_a_proj_with_mqa)\.(weight|bias)$",
        r".self_attn.qkv_a_proj.\2",
        named_shard(1),
    ),
    # Dense MLPs and shared experts: gate|up packed.
    WeightRule(r"\.(gate|up)_proj\.(weight|bias)$", r".gate_up_proj.\2", named_shard(1)),
)


# config.json keys MLA and the MoE layers cannot do without (q_lora_rank may be null).
REQUIRED_KEYS = (
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
)


def yarn_softmax_mscale(rope: dict) -> float:
    """The softmax scale's factor under yarn with `mscale_all_dim` (1 otherwise)."""
    factor, mscale_all_dim = rope.get("factor"), rope.get("mscale_all_dim")
    if rope.get("rope_type", "default") == "default" or not mscale_all_dim or not factor:
        return 1.0
    if factor <= 1:
        return 1.0
    mscale = 0.1 * float(mscale_all_dim) * math.log(float(factor)) + 1.0
    return mscale * mscale


class LatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, interleaved_rope: bool) -> None:
        super().__init__()
        raw = cfg.raw
        self.num_heads = cfg.num_heads
        self.q_lora_rank = raw.get("q_lora_rank")
        self.kv_lora_rank = int(raw["kv_lora_rank"])
        self.nope_dim = int(raw["qk_nope_head_dim"])
        self.rope_dim = int(raw["qk_rope_head_dim"])
        self.v_dim = int(raw["v_head_dim"])
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleaved_rope = interleaved_rope
        bias = bool(raw.get("attention_bias", False))
        hidden, heads = cfg.hidden_size, cfg.num_heads
        kv_a = self.kv_lora_rank + self.rope_dim
        if self.q_lora_rank:
            self.qkv_a_proj = PackedLinear(
                hidden, {"q_a_proj": self.q_lora_rank, "kv_a_proj_with_mqa": kv_a}, bias=bias
            )
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * self.qk_dim, bias=False)
            self.qkv_a_proj = PackedLinear(hidden, {"kv_a_proj_with_mqa": kv_a}, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)
        self.rotary = rotary
        scale = self.qk_dim**-0.5 * yarn_softmax_mscale(cfg.rope)
        self.ops = LatentAttentionOps(self.kv_lora_rank, self.rope_dim, scale)

    def _project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, heads, qk_dim], [latent | rope key] [T, kv_lora_rank + rope_dim])."""
        if self.q_lora_rank:
            q_a, kv_a = self.qkv_a_proj.split(hidden)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q, kv_a = self.q_proj(hidden), self.qkv_a_proj(hidden)
        return q.view(-1, self.num_heads, self.qk_dim), kv_a

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        # Interleaved pairs (x0, x1), (x2, x3)... -> halves, so rotate-half rotates each pair.
        return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1) if self.interleaved_rope else x

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [heads, nope, latent] and W_UV [heads, v, latent], views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, -1)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, kv_a = self._project(hidden)
        latent = self.kv_a_layernorm(kv_a[:, : self.kv_lora_rank])
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope, rope_key = self.rotary(
            positions, self._rope(q_rope), self._rope(kv_a[:, None, self.kv_lora_rank :])
        )
        rope_key = rope_key[:, 0]
        write_latent(latent, rope_key, cache, meta.slot_mapping)
        out = hidden.new_empty(hidden.shape[0], self.num_heads, self.v_dim)
        num_decode = meta.num_decode_tokens
        if num_decode:
            out[:num_decode] = self._decode(q_nope[:num_decode], q_rope[:num_decode], cache, meta)
        if num_decode < hidden.shape[0]:
            self._prefill(q, q_rope, latent, rope_key, cache, meta, out)
        return self.o_proj(out.view(hidden.shape[0], -1))

    def _absorb(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Per-head queries in latent space: [W_UK[h]^T q_nope[h] | q_rope[h]]."""
        w_uk, _ = self._absorbed_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        return torch.cat([q_latent, q_rope], dim=-1)

    def _values(self, latent_out: torch.Tensor) -> torch.Tensor:
        """Attention-weighted latents [n, heads, latent] -> each head's values W_UV[h] c."""
        _, w_uv = self._absorbed_weights()
        return torch.bmm(latent_out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def _decode(self, q_nope, q_rope, cache, meta) -> torch.Tensor:
        return self._values(self.ops.decode(self._absorb(q_nope, q_rope), cache, meta))

    def _prefill(self, q, q_rope, latent, rope_key, cache, meta, out) -> None:
        q_nope = q[..., : self.nope_dim]
        q = torch.cat([q_nope, q_rope], dim=-1)
        per_head = self.qk_dim + self.v_dim
        start = meta.num_decode_tokens
        for i in range(meta.num_decode_tokens, len(meta.query_lens_host)):
            q_len, ctx = meta.query_lens_host[i], meta.context_lens_host[i]
            rows = slice(start, start + q_len)
            start += q_len
            if not self.ops.decompress_chunk(ctx, self.num_heads, per_head, q.element_size()):
                out[rows] = self._absorbed_prefill(q_nope[rows], q_rope[rows], cache, meta, i)
                continue
            ctx_latent, ctx_rope = self.ops.prefill_context(
                cache, meta, i, latent[rows], rope_key[rows]
            )
            kv = self.kv_b_proj(ctx_latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)
            k_nope, values = kv.split([self.nope_dim, self.v_dim], dim=-1)
            keys = torch.cat(
                [k_nope, ctx_rope[:, None, :].expand(-1, self.num_heads, -1).to(k_nope.dtype)],
                dim=-1,
            )
            out[rows] = causal_attention(q[rows], keys, values, self.ops.scale)

    def _absorbed_prefill(self, q_nope, q_rope, cache, meta, index) -> torch.Tensor:
        entries = gather_context(cache, meta.block_tables[index], meta.context_lens_host[index])
        latent_out = absorbed_causal_attention(
            self._absorb(q_nope, q_rope), entries, self.kv_lora_rank, self.ops.scale
        )
        return self._values(latent_out)


class DeepseekDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, interleaved_rope: bool, mlp: nn.Module
    ) -> None:
        super().__init__()
        self.self_attn = LatentAttention(cfg, rotary, interleaved_rope)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, cache, meta):
        """As llama.DecoderLayer: (output, residual stream before it)."""
        residual, normed = self.input_layernorm.add_and_norm(hidden, residual)
        attended = self.self_attn(positions, normed, cache, meta)
        residual, normed = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual


class DeepseekV3ForCausalLM(RoutedExpertsModel, CausalLM):
    weight_rules = DEEPSEEK_WEIGHT_RULES

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        tp = tensor_parallel().size
        if tp > 1:
            # Splitting MLA by heads is possible (the latent cache replicated per rank)
            # but not built: its absorbed decode and latent cache run on one device.
            raise ValueError(
                f"{cfg.architecture}: multi-head latent attention is not tensor-parallel in "
                f"this engine; tensor_parallel_size must be 1 (got {tp})"
            )
        raw = cfg.raw
        missing = [key for key in REQUIRED_KEYS if raw.get(key) is None]
        if missing:
            raise ValueError(f"{cfg.architecture} config.json lacks {', '.join(missing)}")
        self.config = cfg
        # MLA runs its own attention on torch ops whatever backend the engine chose
        # (flash_attn's kernels take per-head keys and values, not latents).
        if backend.name != LatentAttentionBackend.name:
            logger.info(
                "attention: multi-head latent attention on torch SDPA (absorbed decode over "
                "the latent cache), not %s",
                backend.name,
            )
        self.attention_backend = LatentAttentionBackend()
        rope_dim = int(raw["qk_rope_head_dim"])
        rotary = RotaryEmbedding(
            cfg.rope, rope_dim, max(max_positions, cfg.max_position_embeddings)
        )
        dense_layers = int(raw.get("first_k_dense_replace") or 0)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(
                cfg,
                rotary,
                self.interleaved_rope(raw),
                MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
                if i < dense_layers
                else self._moe_block(cfg),
            )
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    @staticmethod
    def _moe_block(cfg: ModelConfig) -> SparseMoeBlock:
        raw = cfg.raw
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(
                f"scoring_func {raw['scoring_func']!r}: DeepseekV3ForCausalLM routes with sigmoid"
            )
        num_experts = int(raw["n_routed_experts"])
        expert_size = int(raw["moe_intermediate_size"])
        shared = int(raw.get("n_shared_experts") or 0)
        return SparseMoeBlock(
            GroupedSigmoidRouter(
                cfg.hidden_size,
                num_experts,
                int(raw["num_experts_per_tok"]),
                num_groups=int(raw.get("n_group") or 1),
                topk_groups=int(raw.get("topk_group") or 1),
                renormalize=bool(raw.get("norm_topk_prob", True)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            ),
            StackedExperts(num_experts, cfg.hidden_size, expert_size),
            shared=MLP(cfg.hidden_size, expert_size * shared) if shared else None,
            shared_name="shared_experts",
        )

    @staticmethod
    def interleaved_rope(raw: dict) -> bool:
        return bool(raw.get("rope_interleave", True))

    @property
    def kv_cache_spec(self) -> LatentKVCacheSpec:
        raw = self.config.raw
        return LatentKVCacheSpec.of(
            int(raw["kv_lora_rank"]),
            int(raw["qk_rope_head_dim"]),
            tuple(range(self.config.num_layers)),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, (cache, _latent_view) in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, cache, meta)
        return self.norm.add_and_norm(hidden, residual)[1]

    def compute_logits(self, hidden: torch.Tensor, native: bool = False) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = cpu_linear.linear(hidden, weight)
        return logits if native else logits.float()


class DeepseekV2ForCausalLM(DeepseekV3ForCausalLM):
    """DeepSeek-V2 / V2.5 / V2-Lite: the same attention (rope always on interleaved pairs),
    softmax routing (greedy or group-limited) without a correction bias."""

    @staticmethod
    def interleaved_rope(raw: dict) -> bool:
        return True

    @staticmethod
    def _moe_block(cfg: ModelConfig) -> SparseMoeBlock:
        raw = cfg.raw
        num_experts = int(raw["n_routed_experts"])
        expert_size = int(raw["moe_intermediate_size"])
        shared = int(raw.get("n_shared_experts") or 0)
        return SparseMoeBlock(
            GroupLimitedSoftmaxRouter(
                cfg.hidden_size,
                num_experts,
                int(raw["num_experts_per_tok"]),
                method=raw.get("topk_method") or "greedy",
                num_groups=int(raw.get("n_group") or 1),
                topk_groups=int(raw.get("topk_group") or 1),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            ),
            StackedExperts(num_experts, cfg.hidden_size, expert_size),
            shared=(
                MLP(cfg.hidden_size, expert_size * shared, bias=cfg.mlp_bias) if shared else None
            ),
            shared_name="shared_experts",
        )
