"""The checkpoints scripts/parity_sweep.py compares: each registered architecture with the
config variants a plain tiny random checkpoint of it may have (transformers' defaults with
only the sizes shrunk, and the switches an outside check is likely to turn)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

VOCAB = 512

DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# 3 heads of 16: num_key_value_heads must be 1 or 3.
ODD = dict(
    DENSE, hidden_size=48, num_attention_heads=3, intermediate_size=80, num_key_value_heads=1
)
QWEN_MOE = dict(DENSE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
MIXTRAL = dict(DENSE, num_local_experts=4, num_experts_per_tok=2)
GLM_MOE = dict(
    DENSE, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1
)
MLA = dict(
    DENSE,
    num_key_value_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=24,
    # 16 experts: DeepSeek-V3's default 8 groups (top 4) need two experts per group.
    n_routed_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
)
# DeepSeek-V3 and Kimi K2 ship yarn with mscale = mscale_all_dim; V2 ships 0.707.
YARN_MSCALE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str
    settings: dict[str, Any]
    save_dtype: torch.dtype = torch.float32
    shard_size: str | None = None
    # A substring of the load error when the engine refuses this variant on purpose.
    refused: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def cases() -> list[Case]:
    bf16 = torch.bfloat16
    return [
        # Llama
        Case("llama-defaults", "llama", DENSE),
        Case("llama-tied", "llama", dict(DENSE, tie_word_embeddings=True)),
        Case("llama-attention-bias", "llama", dict(DENSE, attention_bias=True)),
        Case("llama-mlp-bias", "llama", dict(DENSE, mlp_bias=True)),
        Case("llama-head-dim-32", "llama", dict(DENSE, head_dim=32)),
        # head_dim 12 is no multiple of the CPU decode kernel's 8 lanes (torch path).
        Case("llama-head-dim-12", "llama", dict(DENSE, head_dim=12)),
        Case("llama-head-dim-80", "llama", dict(DENSE, head_dim=80)),
        Case(
            "llama-odd-vocab-intermediate",
            "llama",
            dict(DENSE, vocab_size=1001, intermediate_size=37),
        ),
        Case("llama-odd-h48-heads3-kv1", "llama", ODD),
        Case("llama-odd-h48-heads3-kv3", "llama", dict(ODD, num_key_value_heads=3)),
        Case("llama-llama3-rope", "llama", dict(DENSE, rope_parameters=LLAMA3_ROPE)),
        Case(
            "llama-linear-rope",
            "llama",
            dict(DENSE, rope_parameters={"rope_type": "linear", "factor": 2.0}),
        ),
        Case(
            "llama-dynamic-rope",
            "llama",
            dict(DENSE, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        ),
        Case(
            "llama-longrope",
            "llama",
            dict(
                DENSE,
                rope_parameters={
                    "rope_type": "longrope",
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 128,
                },
            ),
            refused="rope_type",
        ),
        Case("llama-gelu", "llama", dict(DENSE, hidden_act="gelu"), refused="hidden_act"),
        Case(
            "llama-yarn",
            "llama",
            dict(
                DENSE,
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 128,
                },
            ),
        ),
        Case("llama-bf16-sharded", "llama", DENSE, save_dtype=bf16, shard_size="100KB"),
        # Mistral (default sliding_window 4096 > the context here)
        Case("mistral-defaults", "mistral", DENSE),
        Case("mistral-head-dim-32", "mistral", dict(DENSE, head_dim=32)),
        Case("mistral-tied-bf16", "mistral", dict(DENSE, tie_word_embeddings=True), bf16),
        # Qwen2 (q/k/v bias by architecture)
        Case("qwen2-defaults", "qwen2", DENSE),
        Case("qwen2-tied", "qwen2", dict(DENSE, tie_word_embeddings=True)),
        Case(
            "qwen2-sliding-window-on",
            "qwen2",
            dict(DENSE, use_sliding_window=True, sliding_window=256, max_window_layers=1),
        ),
        Case(
            "qwen2-odd-kv3-sharded", "qwen2", dict(ODD, num_key_value_heads=3), shard_size="100KB"
        ),
        # Qwen3 (q/k norm; default head_dim is its own key)
        Case("qwen3-defaults", "qwen3", DENSE),
        Case("qwen3-head-dim-32-tied", "qwen3", dict(DENSE, head_dim=32, tie_word_embeddings=True)),
        Case("qwen3-attention-bias", "qwen3", dict(DENSE, attention_bias=True)),
        Case("qwen3-bf16", "qwen3", DENSE, save_dtype=bf16),
        Case(
            "qwen3-sliding-window-on",
            "qwen3",
            dict(DENSE, use_sliding_window=True, sliding_window=256, max_window_layers=1),
        ),
        # Qwen2-MoE
        Case("qwen2-moe-defaults", "qwen2_moe", dict(QWEN_MOE, shared_expert_intermediate_size=48)),
        Case(
            "qwen2-moe-no-shared-expert",
            "qwen2_moe",
            dict(QWEN_MOE, shared_expert_intermediate_size=0),
        ),
        Case(
            "qwen2-window-past-last-layer",
            "qwen2",
            dict(DENSE, use_sliding_window=True, sliding_window=64, max_window_layers=2),
        ),
        Case(
            "qwen2-moe-unshrunk-experts",
            "qwen2_moe",
            dict(DENSE, num_experts=60, num_experts_per_tok=4),
        ),
        Case(
            "qwen2-moe-no-qkv-bias",
            "qwen2_moe",
            dict(QWEN_MOE, shared_expert_intermediate_size=48, qkv_bias=False),
        ),
        Case(
            "qwen2-moe-step2-renorm",
            "qwen2_moe",
            dict(
                QWEN_MOE,
                shared_expert_intermediate_size=48,
                decoder_sparse_step=2,
                norm_topk_prob=True,
            ),
        ),
        Case(
            "qwen2-moe-mlp-only-tied",
            "qwen2_moe",
            dict(
                QWEN_MOE,
                shared_expert_intermediate_size=48,
                mlp_only_layers=[0],
                tie_word_embeddings=True,
            ),
        ),
        # Qwen3-MoE
        Case("qwen3-moe-defaults", "qwen3_moe", QWEN_MOE),
        Case(
            "qwen3-moe-head-dim-renorm",
            "qwen3_moe",
            dict(QWEN_MOE, head_dim=32, norm_topk_prob=True, mlp_only_layers=[0]),
        ),
        Case("qwen3-moe-attention-bias", "qwen3_moe", dict(QWEN_MOE, attention_bias=True)),
        Case("qwen3-moe-step2", "qwen3_moe", dict(QWEN_MOE, decoder_sparse_step=2)),
        Case(
            "qwen3-moe-odd-expert-size-vocab",
            "qwen3_moe",
            dict(QWEN_MOE, moe_intermediate_size=37, vocab_size=1001),
        ),
        Case(
            "qwen3-moe-odd-top1",
            "qwen3_moe",
            dict(ODD, num_experts=6, num_experts_per_tok=1, moe_intermediate_size=24),
        ),
        Case(
            "qwen3-moe-top-all",
            "qwen3_moe",
            dict(QWEN_MOE, num_experts=4, num_experts_per_tok=4, norm_topk_prob=True),
        ),
        Case(
            "qwen3-moe-bf16-sharded",
            "qwen3_moe",
            QWEN_MOE,
            save_dtype=bf16,
            shard_size="100KB",
        ),
        # Mixtral
        Case("mixtral-defaults", "mixtral", MIXTRAL),
        Case(
            "mixtral-head-dim-32-tied",
            "mixtral",
            dict(MIXTRAL, head_dim=32, tie_word_embeddings=True),
        ),
        Case(
            "mixtral-odd-kv1",
            "mixtral",
            dict(ODD, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=1),
        ),
        Case("mixtral-bf16-sharded", "mixtral", MIXTRAL, save_dtype=bf16, shard_size="100KB"),
        # GLM-4.5 (partial rope 0.5, one group, scaling 1.0 by default)
        Case("glm4-moe-defaults", "glm4_moe", GLM_MOE),
        Case("glm4-moe-no-shared-expert", "glm4_moe", dict(GLM_MOE, n_shared_experts=0)),
        Case(
            "glm4-moe-glm45-like",
            "glm4_moe",
            dict(
                GLM_MOE,
                head_dim=32,
                attention_bias=True,
                use_qk_norm=True,
                routed_scaling_factor=2.5,
                n_group=1,
                topk_group=1,
            ),
        ),
        Case(
            "glm4-moe-groups-no-renorm",
            "glm4_moe",
            dict(GLM_MOE, n_group=4, topk_group=2, norm_topk_prob=False, first_k_dense_replace=0),
        ),
        Case(
            "glm4-moe-full-rotary-tied",
            "glm4_moe",
            dict(
                GLM_MOE,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 1.0,
                },
                tie_word_embeddings=True,
            ),
        ),
        Case("glm4-moe-bf16", "glm4_moe", GLM_MOE, save_dtype=bf16),
        # head_dim 12: partial rope rotates 6 dims (3 pairs).
        Case(
            "glm4-moe-odd-head-dim-12",
            "glm4_moe",
            dict(GLM_MOE, hidden_size=48, num_key_value_heads=1, first_k_dense_replace=0),
        ),
        # DeepSeek-V2 (softmax routing; num_experts_per_tok has no usable default)
        Case("deepseek-v2-defaults", "deepseek_v2", MLA),
        Case(
            "deepseek-v2-lite",
            "deepseek_v2",
            dict(MLA, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=2),
        ),
        Case(
            "deepseek-v2-group-limited-yarn",
            "deepseek_v2",
            dict(
                MLA,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                routed_scaling_factor=16.0,
                rope_parameters=dict(YARN_MSCALE, mscale=0.707, mscale_all_dim=0.707),
            ),
        ),
        # V2's own expert shapes: 64 experts of 1407 (odd), V2-Lite's top 6.
        Case(
            "deepseek-v2-default-expert-sizes",
            "deepseek_v2",
            dict(
                MLA,
                n_routed_experts=64,
                moe_intermediate_size=1407,
                num_experts_per_tok=6,
                vocab_size=1001,
            ),
        ),
        Case("deepseek-v2-norm-topk", "deepseek_v2", dict(MLA, norm_topk_prob=True)),
        Case(
            "deepseek-v2-mlp-bias",
            "deepseek_v2",
            dict(MLA, mlp_bias=True, first_k_dense_replace=1),
        ),
        # DeepSeek-V3 / Kimi K2
        # first_k_dense_replace defaults to 3: with 2 layers every one is dense.
        Case("deepseek-v3-defaults", "deepseek_v3", MLA),
        Case(
            "deepseek-v3-no-shared-expert",
            "deepseek_v3",
            dict(MLA, first_k_dense_replace=1, n_shared_experts=0),
        ),
        Case("deepseek-v3-default-groups-moe", "deepseek_v3", dict(MLA, first_k_dense_replace=1)),
        Case(
            "deepseek-v3-attention-bias",
            "deepseek_v3",
            dict(MLA, attention_bias=True, first_k_dense_replace=1),
        ),
        Case(
            "deepseek-v3-yarn-mscale",
            "deepseek_v3",
            dict(MLA, rope_parameters=YARN_MSCALE, first_k_dense_replace=1),
        ),
        Case(
            "deepseek-v3-no-q-lora-not-interleaved",
            "deepseek_v3",
            dict(MLA, q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0),
        ),
        Case(
            "kimi-k2-like",
            "deepseek_v3",
            dict(
                MLA,
                n_group=1,
                topk_group=1,
                routed_scaling_factor=2.827,
                first_k_dense_replace=1,
                rope_parameters=dict(YARN_MSCALE, factor=32.0),
            ),
        ),
        Case(
            "deepseek-v3-odd-heads3",
            "deepseek_v3",
            dict(MLA, hidden_size=48, num_attention_heads=3, first_k_dense_replace=1, n_group=4),
        ),
        Case("deepseek-v3-tied-bf16", "deepseek_v3", dict(MLA, tie_word_embeddings=True), bf16),
    ]
