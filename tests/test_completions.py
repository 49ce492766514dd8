"""/v1/completions in process: the endpoint over data/embedded_model (tiny Llama, Mistral v3
tokenizer: BOS `<s>`, FIM tokens [PREFIX]/[SUFFIX]) and over a tiny byte-level model whose
tokenizer, like Qwen's, adds no BOS and, unlike Qwen's, has no FIM tokens.

Greedy text from the random models is mostly one special token; the tests that need
text sample with a seed (top_k -1, ignore_eos), which is reproducible.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi import HTTPException

from flashserve.api.endpoints.completions import CompletionsEndpoint
from flashserve.api.endpoints.completions_fim import assemble, find_fim_format
from flashserve.api.endpoints.completions_prompt import leading_special_ids
from flashserve.api.frontend.model_frontend import ModelFrontend
from flashserve.api.frontend.params import ModelDefaults
from flashserve.config import EngineConfig
from flashserve.engine.async_engine import AsyncEngine
from flashserve.engine.llm_engine import LLMEngine
from tests.chat_harness import EMBEDDED_MODEL, call, make_service, recorded_tokens
from tests.tiny_models import save_tiny_llama

BOS, PREFIX, SUFFIX = 1, 11, 13
SAMPLED = {"temperature": 1.0, "top_k": -1, "ignore_eos": True}
BYTE_EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def chat():
    return make_service()


@pytest.fixture(scope="module")
def endpoint(chat) -> CompletionsEndpoint:
    """Completions over the same frontend (and engine) as `chat`."""
    return CompletionsEndpoint(chat.frontend)


def byte_level_tokenizer(specials: tuple[str, ...] = ()) -> Any:
    """A real byte-level BPE tokenizer (256 byte tokens, no merges) with no BOS rule."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BYTE_EOS, *specials)],
        special_tokens=True,
    )
    tokenizer.eos_token = BYTE_EOS
    return tokenizer


@pytest.fixture(scope="module")
def byte_endpoint(tmp_path_factory) -> CompletionsEndpoint:
    folder: Path = tmp_path_factory.mktemp("byte_model")
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(str(folder))
    save_tiny_llama(folder, vocab_size=len(tokenizer))
    eos = tokenizer.convert_tokens_to_ids(BYTE_EOS)
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.02, max_model_len=256)
    engine = AsyncEngine(LLMEngine(config, folder, eos_token_ids=(eos,)))
    engine.start()
    return CompletionsEndpoint(ModelFrontend(engine, tokenizer, "m", ModelDefaults()))


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Once upon a time", "max_tokens": 8, **fields}


def refused(endpoint: CompletionsEndpoint, request: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(HTTPException) as caught:
        call(endpoint, request)
    assert caught.value.status_code == 400
    return caught.value.detail


def prompt_ids(endpoint: CompletionsEndpoint, **fields: Any) -> list[list[int]]:
    prepared = endpoint.prepare(body(**fields))
    return [generation.prompt_ids for generation in prepared.generations]


def texts(response: dict[str, Any]) -> list[str]:
    return [choice["text"] for choice in response["choices"]]


@contextmanager
def recorded_steps(endpoint: CompletionsEndpoint) -> Iterator[list[set[str]]]:
    """The request ids that got a token in each engine step while the block runs."""
    engine = endpoint.frontend.engine.engine
    steps: list[set[str]] = []
    step = engine.step

    def recording_step():
        outputs = step()
        steps.append({out.request_id for out in outputs})
        return outputs

    engine.step = recording_step
    try:
        yield steps
    finally:
        del engine.step


# -- prompts -> tokens ---------------------------------------------------------------


def test_text_prompt_starts_with_the_tokenizers_bos_once(endpoint):
    tokenizer = endpoint.frontend.tokenizer
    text = "Once upon a time"
    assert prompt_ids(endpoint, prompt=text) == [
        [BOS, *tokenizer.encode(text, add_special_tokens=False)]
    ]
    # A rendered chat prompt already holds its BOS: it is not doubled.
    rendered = "<s>[INST] hi [/INST]"
    assert prompt_ids(endpoint, prompt=rendered) == [
        tokenizer.encode(rendered, add_special_tokens=False)
    ]
    assert prompt_ids(endpoint, prompt=rendered)[0][:2] == [BOS, 3]
    assert prompt_ids(endpoint, prompt=text, add_special_tokens=False) == [
        tokenizer.encode(text, add_special_tokens=False)
    ]


def test_a_tokenizer_without_a_bos_rule_gets_the_text_alone(byte_endpoint):
    tokenizer = byte_endpoint.frontend.tokenizer
    assert leading_special_ids(tokenizer) == []
    assert prompt_ids(byte_endpoint, prompt="hi there") == [tokenizer.encode("hi there")]
    detail = refused(byte_endpoint, body(prompt=""))
    assert detail["param"] == "prompt" and "empty" in detail["message"]
    assert refused(byte_endpoint, body(prompt=["a", ""]))["param"] == "prompt[1]"


def test_token_id_prompts_are_used_as_they_are(endpoint):
    assert prompt_ids(endpoint, prompt=[5, 6, 7]) == [[5, 6, 7]]
    assert prompt_ids(endpoint, prompt=[[5, 6, 7], [BOS, 9]]) == [[5, 6, 7], [BOS, 9]]
    assert prompt_ids(endpoint, prompt=[5, 6, 7, 8], truncate_prompt_tokens=2) == [[7, 8]]


def test_suffix_makes_a_mistral_fill_in_the_middle_prompt(endpoint):
    tokenizer = endpoint.frontend.tokenizer
    prefix, suffix = "def area(r):\n", "    return result\n"
    (ids,) = prompt_ids(endpoint, prompt=prefix, suffix=suffix)
    # mistral-common's layout: <s>[SUFFIX]suffix[PREFIX]prefix, the middle follows.
    assert ids[:2] == [BOS, SUFFIX] and ids.count(PREFIX) == 1
    middle = ids.index(PREFIX)
    assert ids[middle + 1 :] == tokenizer.encode(prefix, add_special_tokens=False)
    # The suffix continues the text: no SentencePiece start-of-text space before it.
    pieces = tokenizer.convert_ids_to_tokens(ids[2:middle])
    assert "".join(pieces).replace("\u2581", " ").replace("<0x0A>", "\n") == suffix


def test_qwen_style_fim_tokens_give_prefix_suffix_middle():
    markers = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    tokenizer = byte_level_tokenizer(markers)
    found = find_fim_format(tokenizer)
    assert found is not None
    fim, ids = found
    assert fim.name == "qwen" and list(ids) == list(markers)
    fim_prefix, fim_suffix, fim_middle = (tokenizer.convert_tokens_to_ids(m) for m in markers)
    prefix, suffix = tokenizer.encode("def f("), tokenizer.encode(")\n")
    assert assemble(fim, ids, prefix, suffix) == [
        fim_prefix, *prefix, fim_suffix, *suffix, fim_middle,
    ]  # fmt: skip
    assert find_fim_format(byte_level_tokenizer()) is None


def test_suffix_on_a_model_without_fim_tokens_is_a_400(byte_endpoint):
    detail = refused(byte_endpoint, body(prompt="def f(", suffix=")"))
    assert detail["param"] == "suffix" and "fill-in-the-middle" in detail["message"]


# -- choices -------------------------------------------------------------------------


def test_several_prompts_give_one_choice_each_as_they_would_alone(byte_endpoint):
    # The byte-level model's next token depends on its prompt (the embedded one's
    # hardly does), so a choice in the wrong place would show.
    prompts = ["The sea", "A cat sat", "Rain fell on"]
    settings = {"temperature": 0, "ignore_eos": True}
    together = call(byte_endpoint, body(prompt=prompts, **settings))
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    alone = [texts(call(byte_endpoint, body(prompt=p, **settings)))[0] for p in prompts]
    assert texts(together) == alone and len(set(alone)) == 3
    assert together["usage"]["completion_tokens"] == 3 * 8
    assert together["usage"]["prompt_tokens"] == sum(
        len(ids) for ids in prompt_ids(byte_endpoint, prompt=prompts)
    )


def test_several_prompts_share_engine_steps(endpoint):
    with recorded_steps(endpoint) as steps:
        call(endpoint, body(prompt=[[5, 6, 7], [8, 9], [10]], **SAMPLED))
    assert max(len(ids) for ids in steps) == 3


def test_streamed_choices_equal_the_whole_body(endpoint):
    request = body(prompt=["The sea", "A cat sat"], seed=5, **SAMPLED)
    whole = call(endpoint, request)
    events = call(endpoint, {**request, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in chunks)
    streamed = ["", ""]
    finishes = []
    for event in chunks:
        (choice,) = event["choices"]
        streamed[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes.append((choice["index"], choice["finish_reason"]))
    assert streamed == texts(whole)
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_echo_opens_each_choice_with_its_prompt(endpoint):
    hello = [BOS, *endpoint.frontend.tokenizer.encode("hello world", add_special_tokens=False)]
    for prompts, echoes in (
        (["The sea", "A cat"], ["The sea", "A cat"]),
        ([hello], ["hello world"]),
    ):
        request = body(prompt=prompts, seed=5, **SAMPLED)
        plain = texts(call(endpoint, request))
        echoed = texts(call(endpoint, {**request, "echo": True}))
        assert echoed == [echo + text for echo, text in zip(echoes, plain)]
        events = call(endpoint, {**request, "echo": True, "stream": True})
        firsts = [e["choices"][0] for e in events[: len(prompts)]]
        assert [(c["index"], c["text"]) for c in firsts] == list(enumerate(echoes))


# -- sampling fields -------------------------------------------------------------------


def test_logprobs_have_the_legacy_shape(endpoint):
    response = call(endpoint, body(logprobs=3, seed=1, bad_token_ids=list(range(3, 40)), **SAMPLED))
    (choice,) = response["choices"]
    logprobs, text = choice["logprobs"], choice["text"]
    tokens = logprobs["tokens"]
    assert len(tokens) == response["usage"]["completion_tokens"] == 8
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    for token, logprob, top, offset in zip(
        tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], logprobs["text_offset"]
    ):
        assert logprob <= 0 and top[token] == logprob
        assert 3 <= len(top) <= 4 and max(top.values()) >= logprob
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_text_offsets_point_at_each_tokens_text_when_text_is_held_back(endpoint):
    schema = {
        "type": "object",
        "properties": {"w": {"type": "string", "enum": ["sea 🌊 ünï"]}},
        "required": ["w"],
        "additionalProperties": False,
    }
    request = body(
        max_tokens=40,
        temperature=0,
        logprobs=0,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    (choice,) = call(endpoint, request)["choices"]
    text, logprobs = choice["text"], choice["logprobs"]
    assert json.loads(text) == {"w": "sea 🌊 ünï"}
    pairs = list(zip(logprobs["tokens"], logprobs["text_offset"]))
    if choice["finish_reason"] == "stop":
        pairs = pairs[:-1]  # the EOS token has no text
    for token, offset in pairs:
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token, (token, offset, text)


def test_logprobs_zero_lists_the_sampled_token_only(endpoint):
    response = call(endpoint, body(logprobs=0, seed=1, **SAMPLED))
    logprobs = response["choices"][0]["logprobs"]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[t] for t in logprobs["tokens"]]


def test_stop_string_ends_the_choice(endpoint):
    request = body(seed=7, max_tokens=12, **SAMPLED)
    (full,) = texts(call(endpoint, request))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    (choice,) = call(endpoint, {**request, "stop": [stop]})["choices"]
    assert choice["text"] == full[: full.index(stop)]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)


def test_stop_token_ids_and_min_tokens(endpoint):
    with recorded_tokens(endpoint) as produced:
        first = call(endpoint, body(seed=9, **SAMPLED))
    stop_token = produced[first["id"]][3]
    (choice,) = call(endpoint, body(seed=9, stop_token_ids=[stop_token], **SAMPLED))["choices"]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_token)
    with recorded_tokens(endpoint) as produced:
        response = call(endpoint, body(min_tokens=6, max_tokens=6, temperature=0))
    assert len(produced[response["id"]]) == 6


def test_logit_bias_and_bad_token_ids_reach_the_sampler(endpoint):
    hello = endpoint.frontend.tokenizer.convert_tokens_to_ids("\u2581hello")
    request = body(seed=5, logit_bias={str(hello): 100}, **SAMPLED)
    with recorded_tokens(endpoint) as produced:
        biased = call(endpoint, request)
        banned = call(endpoint, {**request, "bad_token_ids": [hello]})
    assert produced[biased["id"]] == [hello] * 8
    assert hello not in produced[banned["id"]] and len(produced[banned["id"]]) == 8


def test_response_format_json_schema_constrains_the_text(endpoint):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    (choice,) = call(
        endpoint, body(max_tokens=30, seed=2, temperature=1.0, response_format=response_format)
    )["choices"]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["text"]), schema)


def test_same_tokens_as_chat_on_the_rendered_prompt(chat, endpoint):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    rendered = endpoint.frontend.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    settings = {"max_tokens": 12, "seed": 21, **SAMPLED}
    with recorded_tokens(endpoint) as produced:
        by_chat = call(chat, {"model": "m", "messages": messages, **settings})
        by_completions = call(endpoint, {"model": "m", "prompt": rendered, **settings})
    assert produced[by_chat["id"]] == produced[by_completions["id"]]
    assert len(produced[by_chat["id"]]) == 12
    assert by_chat["choices"][0]["message"]["content"] == by_completions["choices"][0]["text"]
    assert by_chat["usage"]["prompt_tokens"] == by_completions["usage"]["prompt_tokens"]


def test_closing_a_stream_of_several_prompts_aborts_them_all(endpoint):
    engine = endpoint.frontend.engine.engine

    async def read_two_events_and_leave() -> None:
        request = body(prompt=["a", "b", "c"], max_tokens=400, stream=True, **SAMPLED)
        response = await endpoint.create(request)
        stream = response.body_iterator
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(read_two_events_and_leave())
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.02)
    blocks = engine.block_manager
    assert not engine.has_work() and not engine.sequences
    assert not any(blocks.ref_counts)


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"echo": True, "logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt[0]"),
        ({"prompt": [3, -1]}, "prompt"),
        ({"prompt": [3, 40000]}, "prompt[1]"),
        ({"prompt": [[3], [4, 40000]]}, "prompt[1][1]"),
        ({"prompt": list(range(3, 1100))}, "prompt"),
        ({"prompt": ["ok", [3]]}, "prompt"),  # text and token ids do not mix, as in OpenAI's
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"min_tokens": 20}, "min_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"suffix": "x", "truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
        ({"suffix": 3}, "suffix"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"stop_token_ids": [40000]}, "stop_token_ids"),
        ({"logit_bias": {"x": 1}}, "logit_bias.x"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(endpoint, change, param):
    detail = refused(endpoint, body(**change))
    assert detail["param"] == param, detail
    assert detail["type"] == "invalid_request_error"


def test_missing_prompt_is_named(endpoint):
    request = body()
    del request["prompt"]
    assert refused(endpoint, request)["param"] == "prompt"


def test_schema_file_is_built_from_the_chat_schema():
    """data/CompletionRequest.schema.json is what scripts/build_completion_schema.py
    writes from the current chat schema (re-run the script when this fails)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_completion_schema.py"
    spec = importlib.util.spec_from_file_location("build_completion_schema", script)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    chat = json.loads(builder.CHAT_SCHEMA.read_text(encoding="utf-8"))
    assert builder.OUTPUT.read_text(encoding="utf-8") == builder.render(builder.build(chat))


def test_prompts_beyond_a_full_queue_fail_the_whole_request_with_503():
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_memory_gb=0.02, max_model_len=256)
    engine = AsyncEngine(LLMEngine(config, EMBEDDED_MODEL, eos_token_ids=(2,)), max_queue_size=2)
    engine.start()
    from transformers import AutoTokenizer

    frontend = ModelFrontend(
        engine, AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL)), "m", ModelDefaults()
    )
    endpoint = CompletionsEndpoint(frontend)
    with pytest.raises(HTTPException) as caught:
        call(endpoint, body(prompt=["a", "b", "c", "d"], max_tokens=50, **SAMPLED))
    assert caught.value.status_code == 503 and caught.value.headers["Retry-After"] == "1"
    deadline = time.monotonic() + 10
    while (engine.engine.has_work() or engine._streams) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.engine.has_work() and not engine._streams
    # The refused request took nothing with it: the next one is served.
    assert texts(call(endpoint, body(prompt=["a", "b"], max_tokens=2)))
