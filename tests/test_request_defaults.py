"""Defaults the issue spells out: temperature, top_k, max_tokens clipping, nulls as unset."""

from __future__ import annotations

import pytest

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.endpoints.request_schema import RequestValidator
from flashserve.api.frontend.params import ModelDefaults, to_sampling_params
from flashserve.api.http.errors import RequestError

MESSAGES = [{"role": "user", "content": "hi"}]


def params(
    body: dict,
    defaults: ModelDefaults | None = None,
    prompt_len: int = 10,
    max_model_len: int = 2048,
):
    body = RequestValidator().validate({"model": "m", "messages": MESSAGES, **body})
    return to_sampling_params(
        ChatRequest.model_validate(body),
        defaults or ModelDefaults(),
        prompt_len=prompt_len,
        max_model_len=max_model_len,
        vocab_size=1000,
    )


def test_null_optional_fields_mean_unset():
    body = RequestValidator().validate(
        {"model": "m", "messages": MESSAGES, "temperature": None, "stop": None, "seed": None}
    )
    assert body == {"model": "m", "messages": MESSAGES}


def test_temperature_defaults_to_generation_config_then_one():
    assert params({}, ModelDefaults(temperature=0.6)).temperature == 0.6
    assert params({"temperature": None}, ModelDefaults(temperature=0.6)).temperature == 0.6
    assert params({}).temperature == 1.0
    assert params({"temperature": 0}).greedy
    assert ModelDefaults.from_generation_config({"do_sample": False}).temperature == 0.0


def test_top_k_default_is_50_and_minus_one_disables():
    assert params({}).top_k == 50
    assert params({"top_k": -1}).top_k == -1


def test_max_tokens_defaults_to_4096_and_is_clipped_to_the_context_left():
    assert params({}, max_model_len=100_000).max_tokens == 4096
    assert params({"max_tokens": 5000}, prompt_len=100, max_model_len=2048).max_tokens == 1948


def test_prompt_that_fills_the_context_is_a_400_naming_messages():
    with pytest.raises(RequestError) as raised:
        params({}, prompt_len=2048, max_model_len=2048)
    assert raised.value.param == "messages" and "context" in raised.value.message
