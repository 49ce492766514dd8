"""Tiny random-weight checkpoints, written the way transformers saves real ones."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def random_model(
    config: transformers.PretrainedConfig,
    seed: int,
    scale: float,
    *,
    perturb: bool = False,
    router_bias_scale: float | None = None,
) -> transformers.PreTrainedModel:
    """transformers' own fp32 model for `config`, its weights drawn from `seed`.

    Every parameter becomes N(0, scale) noise, or with `perturb` its initial value plus
    that noise (norms stay near 1, biases become non-zero); with `router_bias_scale`
    the routers' e_score_correction_bias buffers are drawn too, so that they matter.
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn_like(param) * scale
            if perturb:
                param.add_(noise)
            else:
                param.copy_(noise)
        if router_bias_scale is not None:
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.copy_(torch.randn_like(buffer) * router_bias_scale)
    return model


def save_tiny_llama(path: Path, vocab_size: int = 512, seed: int = 0, **overrides) -> Path:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    # Overrides replace the defaults (a GPU test widens the heads, for instance).
    config = transformers.LlamaConfig(**{**settings, **overrides})
    # Larger weights than the default init give peaked, input-dependent next-token
    # distributions, which make greedy comparisons meaningful.
    random_model(config, seed, 0.3).save_pretrained(path)
    return path


def _save_random(config, path: Path, seed: int, scale: float) -> Path:
    random_model(config, seed, scale, router_bias_scale=0.1).save_pretrained(path)
    return path


MOE_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
)


def save_tiny_qwen3_moe(path: Path, vocab_size: int = 512, seed: int = 0, **overrides) -> Path:
    """A Qwen3-MoE of 8 experts (top 2), its first layer dense (mlp_only_layers)."""
    settings = dict(
        MOE_SHAPE,
        vocab_size=vocab_size,
        num_experts=8,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        tie_word_embeddings=True,
    )
    config = transformers.Qwen3MoeConfig(**{**settings, **overrides})
    return _save_random(config, path, seed, 0.3)


def save_tiny_glm4_moe(path: Path, vocab_size: int = 512, seed: int = 0, **overrides) -> Path:
    """A GLM-4.5-shaped MoE: first layer dense, then 8 sigmoid-routed experts in 4 groups
    (top 2 groups, top 2 experts) and a shared expert; partial rope, q/k/v bias."""
    settings = dict(
        MOE_SHAPE,
        vocab_size=vocab_size,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    config = transformers.Glm4MoeConfig(**{**settings, **overrides})
    return _save_random(config, path, seed, 0.3)
