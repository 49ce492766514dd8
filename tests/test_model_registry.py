"""The registry picks a model class from config.json; what it cannot serve is refused up front."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers

from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.models.base import CausalLM
from flashserve.models.model_config import ModelConfig
from flashserve.models.registry import (
    ARCHITECTURES,
    UnsupportedModelError,
    model_class,
    supported_architectures,
)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_registered_architecture_resolves_to_a_model_class(name):
    cls = model_class(name)
    assert issubclass(cls, CausalLM)


def test_unsupported_architecture_is_a_load_error_naming_it_and_the_supported_ones(tmp_path):
    config = {
        "architectures": ["FancyNewForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as info:
        LLMEngine(EngineConfig(device="cpu", dtype="float32"), tmp_path)
    message = str(info.value)
    assert "'FancyNewForCausalLM'" in message
    for name in supported_architectures():
        assert name in message


def test_sliding_window_is_read_only_where_the_config_uses_it():
    base = dict(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    mistral = {"architectures": ["MistralForCausalLM"], "sliding_window": 4096, **base}
    qwen = {
        "architectures": ["Qwen2ForCausalLM"],
        "sliding_window": 4096,
        "use_sliding_window": False,
        **base,
    }
    assert ModelConfig.from_dict(mistral).sliding_window == 4096
    assert ModelConfig.from_dict(qwen).sliding_window is None


def test_qwen_windows_start_at_max_window_layers():
    qwen = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "sliding_window": 64,
        "use_sliding_window": True,
    }
    assert ModelConfig.from_dict({**qwen, "max_window_layers": 1}).sliding_window == 64
    # No layer from max_window_layers on: every layer attends to the whole context.
    assert ModelConfig.from_dict({**qwen, "max_window_layers": 2}).sliding_window is None
    # As transformers writes them (its `layer_types` follow max_window_layers).
    settings = {k: v for k, v in qwen.items() if k != "architectures"}
    for first_sliding, window in ((1, 64), (2, None)):
        saved = transformers.Qwen2Config(**settings, max_window_layers=first_sliding).to_dict()
        assert (
            ModelConfig.from_dict({**saved, "architectures": qwen["architectures"]}).sliding_window
            == window
        )
        del saved["max_window_layers"]  # layer_types alone decide too
        assert (
            ModelConfig.from_dict({**saved, "architectures": qwen["architectures"]}).sliding_window
            == window
        )


def test_an_activation_other_than_silu_is_refused():
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "gelu",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(UnsupportedModelError, match="'gelu'"):
        ModelConfig.from_dict(raw)


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-mistral")
    config = transformers.MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        sliding_window=128,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _engine(path):
    return LLMEngine(
        EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.01, max_model_len=512),
        path,
    )


def test_a_sliding_window_caps_the_context(tiny_mistral, caplog):
    engine = _engine(tiny_mistral)
    assert engine.max_model_len == 128
    assert "sliding window of 128 tokens" in caplog.text


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    (file,) = src.glob("*.safetensors")
    tensors = safetensors.torch.load_file(str(file))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(dst / file.name))
    return dst


def test_a_missing_tensor_is_named(tiny_mistral, tmp_path):
    folder = _rewrite(
        tiny_mistral, tmp_path / "m", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight")
    )
    with pytest.raises(ValueError, match=r"lacks tensors for: \['layers.0.self_attn.qkv_proj"):
        _engine(folder)


def test_a_tensor_of_the_wrong_shape_is_named(tiny_mistral, tmp_path):
    def widen(tensors):
        name = "model.layers.0.mlp.up_proj.weight"
        tensors[name] = torch.zeros(49, 32)

    folder = _rewrite(tiny_mistral, tmp_path / "m", widen)
    with pytest.raises(
        ValueError, match=r"up_proj.weight: shard 'up': checkpoint tensor has shape"
    ):
        _engine(folder)


def test_a_quantized_checkpoint_is_refused_not_cast():
    raw = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "quantization_config": {"quant_method": "gptq", "bits": 4},
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(UnsupportedModelError, match=r"quant_method 'gptq' is not supported"):
        ModelConfig.from_dict(raw)
    # FP8 with per-tensor scales has no block scales to apply: refused too.
    raw["quantization_config"] = {"quant_method": "fp8"}
    with pytest.raises(UnsupportedModelError, match="fp8 without weight_block_size"):
        ModelConfig.from_dict(raw)
    # Block-wise FP8 (DeepSeek-V3's format) is dequantized at load (test_fp8_checkpoint.py).
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert ModelConfig.from_dict(raw).architecture == "Qwen3MoeForCausalLM"
