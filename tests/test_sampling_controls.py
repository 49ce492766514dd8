"""Issue 3, sampling side: every sampling control in the schema has its stated effect.

End to end through ChatEndpoint over data/embedded_model (a real 32k SentencePiece
tokenizer); the numeric checks on tensors and on LLMEngine over a tiny random Llama are
in test_logits_processors.py and test_sampler.py.
"""

from __future__ import annotations

import logging

import pytest
from fastapi import HTTPException

from flashserve.api.endpoints.chat_protocol import ChatRequest
from flashserve.api.frontend.bad_words import bad_word_sequences
from flashserve.api.frontend.params import ModelDefaults, to_sampling_params
from tests.chat_harness import (
    EOS,
    body,
    call,
    content,
    make_service,
    recorded_tokens,
    streamed_content,
)
from tests.sampling_harness import contains_run


@pytest.fixture(scope="module")
def service():
    svc = make_service()
    yield svc
    svc.frontend.engine.shutdown()


# -- end to end through ChatEndpoint ------------------------------------------------


def token_strings(response) -> list[str]:
    return [entry["token"] for entry in response["choices"][0]["logprobs"]["content"]]


def test_logit_bias_plus_100_forces_its_token_and_unknown_ids_are_400(service):
    hello = service.frontend.tokenizer.convert_tokens_to_ids("▁Hello")
    forced = call(service, body(logit_bias={str(hello): 100}, max_tokens=4, temperature=1.0))
    assert content(forced).split() == ["Hello"] * 4
    greedy = call(service, body(max_tokens=1, logprobs=True))
    first = greedy["choices"][0]["logprobs"]["content"][0]["token"]
    first_id = service.frontend.tokenizer.convert_tokens_to_ids(first)
    pushed = call(service, body(max_tokens=1, logprobs=True, logit_bias={str(first_id): -100}))
    assert token_strings(pushed)[0] != first
    with pytest.raises(HTTPException) as raised:
        call(service, body(logit_bias={"40000": 5}))
    assert raised.value.status_code == 400 and raised.value.detail["param"] == "logit_bias.40000"


def test_bad_phrases_are_never_produced(service):
    plain = content(call(service, body(max_tokens=24, presence_penalty=2.0, ignore_eos=True)))
    word = next(w for w in plain.split() if len(w) >= 4 and w.isalpha())
    banned = content(
        call(service, body(max_tokens=24, presence_penalty=2.0, ignore_eos=True, bad=[word]))
    )
    assert word not in banned.split() and banned != plain
    # Sampled at length, with every tokenization of several phrases banned.
    phrases = [word, "the", "Hello world"]
    forms = bad_word_sequences(service.frontend.tokenizer, phrases)
    assert len(forms) >= 2 * len(phrases)
    with recorded_tokens(service) as produced:
        ids = [
            call(
                service, body(max_tokens=64, temperature=1.2, seed=s, ignore_eos=True, bad=phrases)
            )["id"]
            for s in range(3)
        ]
    for rid in ids:
        assert len(produced[rid]) == 64
        assert not any(contains_run(produced[rid], form) for form in forms)


def test_penalties_change_greedy_output(service):
    plain = token_strings(call(service, body(max_tokens=24, logprobs=True, ignore_eos=True)))
    for field in ("frequency_penalty", "presence_penalty"):
        penalized = token_strings(
            call(service, body(max_tokens=24, logprobs=True, ignore_eos=True, **{field: 2.0}))
        )
        assert len(set(penalized)) > len(set(plain)), field
    repeated = token_strings(
        call(service, body(max_tokens=24, logprobs=True, ignore_eos=True, repetition_penalty=2.0))
    )
    assert len(set(repeated)) > len(set(plain))
    # The prompt counts for repetition_penalty: the greedy loop on the prompt's
    # last token ([/INST]) is gone at once.
    assert plain[0] == "[/INST]" and repeated[0] != "[/INST]"


def test_min_tokens_and_ignore_eos_hold_back_the_end(service):
    eos_first = {str(EOS): 100}
    assert call(service, body(logit_bias=eos_first))["usage"]["completion_tokens"] == 1
    held = call(service, body(logit_bias=eos_first, min_tokens=5))
    assert held["usage"]["completion_tokens"] == 6
    assert held["choices"][0]["finish_reason"] == "stop"
    ignored = call(service, body(logit_bias=eos_first, ignore_eos=True, max_tokens=7))
    assert ignored["usage"]["completion_tokens"] == 7
    assert ignored["choices"][0]["finish_reason"] == "length"


def test_stop_token_and_stop_string_name_the_stop_reason(service):
    hello = service.frontend.tokenizer.convert_tokens_to_ids("▁Hello")
    forced = body(logit_bias={str(hello): 100}, max_tokens=8)
    by_token = call(service, {**forced, "stop_token_ids": [hello]})
    assert by_token["choices"][0]["stop_reason"] == hello
    assert by_token["choices"][0]["finish_reason"] == "stop" and content(by_token) == ""
    included = call(
        service, {**forced, "stop_token_ids": [hello], "include_stop_str_in_output": True}
    )
    assert content(included).strip() == "Hello"
    by_string = call(service, {**forced, "stop": ["lo H"]})
    assert content(by_string) == "Hel" and by_string["choices"][0]["stop_reason"] == "lo H"
    with_string = call(service, {**forced, "stop": ["lo H"], "include_stop_str_in_output": True})
    assert content(with_string) == "Hello H"
    assert with_string["choices"][0]["stop_reason"] == "lo H"


def test_a_stop_string_counts_only_from_min_tokens_on(service):
    hello = service.frontend.tokenizer.convert_tokens_to_ids("▁Hello")
    forced = body(logit_bias={str(hello): 100}, max_tokens=8, stop=["Hello"])
    assert (
        content(call(service, forced)) == ""
        and call(service, forced)["usage"]["completion_tokens"] == 1
    )
    held = call(service, {**forced, "min_tokens": 3})
    assert content(held).strip() == "Hello Hello"
    assert held["usage"]["completion_tokens"] == 3
    assert held["choices"][0]["stop_reason"] == "Hello"
    streamed = call(service, {**forced, "min_tokens": 3, "stream": True})
    assert streamed_content(streamed) == content(held)


def test_seed_reproduces_through_the_api(service):
    sampled = body(temperature=1.0, max_tokens=12, ignore_eos=True)
    a = content(call(service, {**sampled, "seed": 11}))
    assert content(call(service, {**sampled, "seed": 11})) == a
    assert content(call(service, {**sampled, "seed": 12})) != a


def test_logprobs_in_openai_format_with_bytes(service):
    out = call(service, body(temperature=1.0, seed=3, max_tokens=10, logprobs=True, top_logprobs=3))
    entries = out["choices"][0]["logprobs"]["content"]
    assert len(entries) == out["usage"]["completion_tokens"]
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert len(entry["top_logprobs"]) == 3
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True) and entry["logprob"] <= values[0] + 1e-6
    without_top = call(service, body(max_tokens=3, logprobs=True))
    assert all(e["top_logprobs"] == [] for e in without_top["choices"][0]["logprobs"]["content"])
    assert call(service, body(max_tokens=3))["choices"][0]["logprobs"] is None
    with pytest.raises(HTTPException):
        call(service, body(logprobs=True, top_logprobs=21))


def test_length_penalty_and_early_stopping_are_validated_and_change_nothing(service):
    plain = call(service, body(max_tokens=10, presence_penalty=1.0))
    tuned = call(
        service, body(max_tokens=10, presence_penalty=1.0, length_penalty=2.5, early_stopping=True)
    )
    assert content(tuned) == content(plain)
    with pytest.raises(HTTPException):
        call(service, body(length_penalty="long"))


def test_special_tokens_in_the_text(service):
    inst = {"3": 100}  # [INST]
    assert content(call(service, body(logit_bias=inst, max_tokens=3))) == ""
    kept = content(call(service, body(logit_bias=inst, max_tokens=3, skip_special_tokens=False)))
    assert kept.count("[INST]") == 3
    tight = content(
        call(
            service,
            body(
                logit_bias=inst,
                max_tokens=3,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            ),
        )
    )
    assert tight == "[INST][INST][INST]" and kept != tight


def test_continuous_usage_stats_put_running_usage_on_every_chunk(service):
    events = call(
        service,
        body(
            stream=True,
            max_tokens=6,
            ignore_eos=True,
            stream_options={"continuous_usage_stats": True},
        ),
    )
    chunks = [e for e in events if isinstance(e, dict)]
    assert all("usage" in c for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert done == sorted(done) and done[-1] == 6
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    quiet = call(
        service,
        body(
            stream=True,
            max_tokens=6,
            ignore_eos=True,
            stream_options={"continuous_usage_stats": False},
        ),
    )
    assert all("usage" not in e for e in quiet[:-2] if isinstance(e, dict))
    assert streamed_content(quiet) == streamed_content(events)


def test_user_is_logged_with_the_request_id_and_never_echoed(service, caplog):
    with caplog.at_level(logging.INFO, logger="flashserve.requests"):
        out = call(service, body(user="user-8472", max_tokens=2))
    records = [r for r in caplog.records if getattr(r, "user", None) == "user-8472"]
    assert records and records[0].request_id == out["id"]
    assert "user-8472" not in repr(out)


def test_repetition_penalty_defaults_to_the_models_generation_config():
    def penalty(**fields) -> float:
        request = ChatRequest.model_validate({"model": "m", "messages": [], **fields})
        defaults = ModelDefaults.from_generation_config({"repetition_penalty": 1.1})
        return to_sampling_params(
            request, defaults, prompt_len=4, max_model_len=64, vocab_size=10
        ).repetition_penalty

    assert penalty() == 1.1
    assert penalty(repetition_penalty=1.0) == 1.0
