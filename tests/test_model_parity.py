"""Each supported architecture gives the same logits as transformers' own implementation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.engine_harness import assert_logits_match, make_engine
from tests.tiny_models import random_model

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

ARCHITECTURES = {
    "llama3-rope-scaling": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        ),
    ),
    "llama-linear-rope-tied": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    # Dynamic NTK changes nothing up to max_position_embeddings, where max_model_len stops.
    "llama-dynamic-rope": (
        transformers.LlamaConfig,
        dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    ),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2-bias-tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2-yarn": (
        transformers.Qwen2Config,
        dict(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        ),
    ),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(tie_word_embeddings=True, head_dim=32)),
    # attention_bias puts a bias on q, k, v and o; mlp_bias on gate, up and down.
    "llama-attention-and-mlp-bias": (
        transformers.LlamaConfig,
        dict(attention_bias=True, mlp_bias=True),
    ),
    "qwen3-attention-bias": (transformers.Qwen3Config, dict(attention_bias=True)),
}


def _save_random_model(config_cls, extra, path):
    # Random norms and biases too, so they matter.
    model = random_model(config_cls(**COMMON, **extra), 0, 0.05, perturb=True)
    # Small shards: the loader must assemble tensors across files.
    model.save_pretrained(path, max_shard_size="200KB")
    return model.eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_logits_match_transformers(name, tmp_path):
    config_cls, extra = ARCHITECTURES[name]
    reference = _save_random_model(config_cls, extra, tmp_path)
    engine = make_engine(tmp_path, kv_cache_memory_gb=0.01, max_model_len=512)
    token_ids = torch.randint(
        0, COMMON["vocab_size"], (200,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    # Whole prompt at once, in chunks that straddle KV blocks, and one token at a time.
    assert_logits_match(engine, reference, token_ids, (200, 37, 1), name)


def test_checkpoint_tensor_without_a_place_is_a_load_error(tmp_path):
    """Weights the config does not announce (here q/k/v/o biases with attention_bias
    false) fail the load by name rather than being dropped."""
    _save_random_model(transformers.LlamaConfig, dict(attention_bias=True), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_bias"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has no place for: \[.*self_attn\.[qkvo]_proj\.bias"):
        make_engine(tmp_path, kv_cache_memory_gb=0.01, max_model_len=512)
