"""Tiny random-weight checkpoints, written the way transformers saves real ones."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def save_tiny_llama(path: Path, vocab_size: int = 512, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
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
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            # Larger weights than the default init give peaked, input-dependent
            # next-token distributions, which make greedy comparisons meaningful.
            param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(path)
    return path
