"""Random Llama-family weights under Hugging Face's tensor names, reproducibly.

Shared by the embedded model (scripts/make_embedded_model.py, whose files a test
compares byte for byte) and the benchmark model (bench/make_bench_model.py).
"""

from __future__ import annotations

from typing import Any

import torch


def random_llama_weights(
    config: dict[str, Any], seed: int, std: float = 0.02, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """bf16 tensors: normal(0, std) matrices, RMSNorm weights of one; lm_head only if untied."""
    gen = torch.Generator(device).manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        # Drawn in fp32 then rounded, so the values don't depend on bf16 RNG kernels.
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    # Insertion order fixes the draw order: changing it changes every weight after it.
    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights[f"{p}.self_attn.q_proj.weight"] = normal(q_dim, hidden)
        weights[f"{p}.self_attn.k_proj.weight"] = normal(kv_dim, hidden)
        weights[f"{p}.self_attn.v_proj.weight"] = normal(kv_dim, hidden)
        weights[f"{p}.self_attn.o_proj.weight"] = normal(hidden, q_dim)
        weights[f"{p}.mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[f"{p}.mlp.up_proj.weight"] = normal(inter, hidden)
        weights[f"{p}.mlp.down_proj.weight"] = normal(hidden, inter)
        weights[f"{p}.input_layernorm.weight"] = ones(hidden)
        weights[f"{p}.post_attention_layernorm.weight"] = ones(hidden)
    weights["model.norm.weight"] = ones(hidden)
    if not config.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights
