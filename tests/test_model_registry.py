"""The registry picks a model class from config.json; what it cannot serve is refused up front."""

from __future__ import annotations

import json

import pytest

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
