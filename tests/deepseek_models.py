"""Tiny random DeepSeek-V3 checkpoints (transformers' own implementation) for MLA tests."""

from __future__ import annotations

import transformers

from tests.tiny_models import random_model

VOCAB = 512
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 0.6,
}


def deepseek_config(
    config_cls: type = transformers.DeepseekV3Config, **overrides
) -> transformers.PretrainedConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters=YARN,
        bos_token_id=0,
        eos_token_id=1,
    )
    settings.update(overrides)
    return config_cls(**settings)


def save_random_deepseek(
    path, seed: int = 0, config_cls: type = transformers.DeepseekV3Config, **overrides
) -> transformers.PreTrainedModel:
    # Random norms and router biases too, so every term matters.
    model = random_model(
        deepseek_config(config_cls, **overrides), seed, 0.05, perturb=True, router_bias_scale=0.05
    )
    model.save_pretrained(path, max_shard_size="200KB")
    return model.eval()


def save_tiny_deepseek(path, vocab_size: int, seed: int = 0):
    """A 2-layer DeepSeek-V3 (one dense layer, one MoE) over a real tokenizer's vocabulary.

    Larger weights than transformers' init give peaked, input-dependent next-token
    distributions (as tests/tiny_models.py does for Llama).
    """
    config = deepseek_config(
        vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=2048
    )
    random_model(config, seed, 0.3).save_pretrained(path)
    return path
