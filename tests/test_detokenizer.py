"""Streaming detokenization with real SentencePiece (byte fallback) and byte-level BPE."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashserve.api.frontend.output.detokenizer import (
    IncrementalDetokenizer,
    detokenize,
    special_token_ids,
)

pytest_plugins = ["tests.tokenizer_fixtures"]

FFFD = "\ufffd"
TOKENIZERS = ["sp_tokenizer", "bpe_tokenizer"]
FLAGS = [(True, True), (True, False), (False, True), (False, False)]

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\n",
    "Grüße aus Köln: Ärger über Öl, naïve café",
    "你好，世界！今天天气很好。我很感谢你的热情",
    "こんにちは世界、カタカナとひらがな",
    "🎉 party 👨‍👩‍👧 family 🇩🇪🇫🇷 flags 🫠🪿",
    "مرحبا بالعالم، كيف حالك؟",
    "ελληνικά, Русский текст, 한국어, हिन्दी",
    "  leading spaces and trailing  ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∮ E⋅da = Q,  n → ∞, ∑ f(i) = ∏ g(i)",
]


def reference_text(tokenizer: Any, ids: list[int], skip: bool, spaces: bool) -> str:
    """The documented result, computed without any windowing."""
    if skip or not spaces:
        return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    special = special_token_ids(tokenizer)
    pieces: list[str] = []
    run: list[int] = []
    for token_id in ids:
        if token_id in special:
            if run:
                pieces.append(tokenizer.decode(run, clean_up_tokenization_spaces=False))
                run = []
            pieces.append(tokenizer.decode([token_id], skip_special_tokens=False))
        else:
            run.append(token_id)
    if run:
        pieces.append(tokenizer.decode(run, clean_up_tokenization_spaces=False))
    return " ".join(p for p in pieces if p)


def stream(
    detokenizer: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int] | None = None
) -> list[str]:
    """Deltas for ``ids`` fed in chunks (one token at a time by default), then the flush."""
    deltas = []
    sizes = iter(chunk_sizes or [])
    i = 0
    while i < len(ids):
        size = max(1, next(sizes, 1))
        deltas.append(detokenizer.add_tokens(ids[i : i + size]))
        i += size
    deltas.append(detokenizer.flush())
    return deltas


def check_stream(
    tokenizer: Any,
    ids: list[int],
    skip: bool,
    spaces: bool,
    chunk_sizes: list[int] | None = None,
) -> list[str]:
    detokenizer = IncrementalDetokenizer(
        tokenizer, skip_special_tokens=skip, spaces_between_special_tokens=spaces
    )
    deltas = stream(detokenizer, ids, chunk_sizes)
    expected = reference_text(tokenizer, ids, skip, spaces)
    assert "".join(deltas) == expected
    assert detokenizer.text == expected
    if FFFD not in expected:
        assert not any(FFFD in delta for delta in deltas), deltas
    return deltas


def interesting_ids(tokenizer: Any) -> list[int]:
    """Ids that stress the detokenizer: specials, bytes, partial characters, bare spaces."""
    special = sorted(special_token_ids(tokenizer))[:24]
    byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    byte_ids = [i for i in byte_ids if i != tokenizer.unk_token_id]
    if not byte_ids:  # byte-level BPE: the 256 single-byte ranks, plus multi-byte pieces
        byte_ids = list(range(1000, 1256))
    pieces = []
    for text in TEXTS:
        pieces += tokenizer.encode(text, add_special_tokens=False)
    return special + byte_ids + pieces


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_encoded_text_one_token_at_a_time(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for skip, spaces in FLAGS:
        deltas = check_stream(tokenizer, ids, skip, spaces)
        assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(6))
def test_encoded_text_in_random_chunks(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.sample(TEXTS, 4))
    ids = tokenizer.encode(text)  # with <s>
    special = sorted(special_token_ids(tokenizer))[:8]
    for _ in range(4):  # special tokens in the middle of words and characters
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
    for skip, spaces in FLAGS:
        check_stream(tokenizer, ids, skip, spaces, [rng.randint(1, 6) for _ in ids])


def test_random_id_sequences(tokenizer: Any) -> None:
    rng = random.Random(1234)
    pool = interesting_ids(tokenizer)
    vocab = len(tokenizer)
    for _ in range(60):
        ids = [
            rng.choice(pool) if rng.random() < 0.7 else rng.randrange(vocab)
            for _ in range(rng.randint(1, 40))
        ]
        chunks = [rng.choice([1, 1, 1, 2, 3, 8]) for _ in ids]
        for skip, spaces in FLAGS:
            check_stream(tokenizer, ids, skip, spaces, chunks)


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_property_any_ids_any_chunks(request: pytest.FixtureRequest, name: str, data) -> None:
    tokenizer = request.getfixturevalue(name)
    pool = interesting_ids(tokenizer)
    token = st.one_of(st.sampled_from(pool), st.integers(0, len(tokenizer) - 1))
    ids = data.draw(st.lists(token, max_size=30), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=30), label="chunks")
    skip, spaces = data.draw(st.sampled_from(FLAGS), label="flags")
    check_stream(tokenizer, ids, skip, spaces, chunks)


def test_multibyte_characters_are_never_split(tokenizer: Any) -> None:
    text = "👨‍👩‍👧🇩🇪🫠 你好 Grüße"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = stream(detokenizer, ids)
    assert "".join(deltas) == text
    assert all(FFFD not in d for d in deltas)
    # Emoji spread over several tokens: something must have been held back and released.
    assert len([d for d in deltas if d]) < len(ids)


def test_sentencepiece_byte_fallback_run_invalidated_later(sp_tokenizer: Any) -> None:
    # The byte-fallback decoder turns a whole run of byte tokens into U+FFFDs as soon as any
    # part is invalid, even bytes that already formed a valid character ("你" here).
    byte = {b: sp_tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xE4, 0xBD, 0xA0)}
    letter = sp_tokenizer.convert_tokens_to_ids("a")
    ids = [byte[0xE4], byte[0xBD], byte[0xA0], byte[0xE4], letter]
    assert sp_tokenizer.decode(ids) == FFFD * 4 + "a"
    detokenizer = IncrementalDetokenizer(sp_tokenizer)
    assert [detokenizer.add_tokens([i]) for i in ids] == ["", "", "", "", FFFD * 4 + "a"]
    valid = IncrementalDetokenizer(sp_tokenizer)
    assert [valid.add_tokens([i]) for i in ids[:3] + [letter]] == ["", "", "", "你a"]


def test_incomplete_bytes_at_the_end_come_out_on_flush(bpe_tokenizer: Any) -> None:
    detokenizer = IncrementalDetokenizer(bpe_tokenizer)
    assert detokenizer.add_tokens(bpe_tokenizer.encode("ok", add_special_tokens=False)) == "ok"
    assert detokenizer.add_tokens([1000 + 0xE4]) == ""  # first byte of a 3-byte character
    assert detokenizer.flush() == FFFD
    assert detokenizer.text == "ok" + FFFD


def test_skip_special_tokens_and_spacing(tokenizer: Any) -> None:
    hi = tokenizer.encode("Hi", add_special_tokens=False)
    there = tokenizer.encode("there", add_special_tokens=False)
    ids = [1, *hi, 2, 3, *there, 4]  # <s> Hi </s> [INST] there [/INST]
    assert detokenize(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)
    spaced = detokenize(tokenizer, ids, skip_special_tokens=False)
    assert spaced == "<s> Hi </s> [INST] there [/INST]"
    joined = detokenize(
        tokenizer, ids, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    assert joined == tokenizer.decode(ids, skip_special_tokens=False)
    assert joined.replace(" ", "") == "<s>Hi</s>[INST]there[/INST]"
    for skip, spaces in FLAGS:
        check_stream(tokenizer, ids, skip, spaces)


def test_sentencepiece_spacing_details(sp_tokenizer: Any) -> None:
    hello = sp_tokenizer.encode("Hello world", add_special_tokens=False)
    ids = [*hello, 2, *hello]
    assert detokenize(sp_tokenizer, ids) == "Hello world Hello world"
    assert detokenize(sp_tokenizer, ids, skip_special_tokens=False) == (
        "Hello world </s> Hello world"
    )
    assert (
        detokenize(
            sp_tokenizer, ids, skip_special_tokens=False, spaces_between_special_tokens=False
        )
        == "Hello world</s> Hello world"
    )


def test_prompt_context_continues_text(tokenizer: Any) -> None:
    full = tokenizer.encode("The capital of France is Paris. It is big.")
    cut = len(tokenizer.encode("The capital of France is"))
    assert tokenizer.decode(full[:cut], skip_special_tokens=True) == "The capital of France is"
    prompt, generated = full[:cut], full[cut:]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(stream(detokenizer, generated)) == " Paris. It is big."


def test_prompt_ending_in_special_token_starts_fresh(tokenizer: Any) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    prompt = list(getattr(prompt, "input_ids", prompt))
    assert prompt[-1] == tokenizer.convert_tokens_to_ids("[/INST]")
    generated = tokenizer.encode("Hello there!", add_special_tokens=False) + [2]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(stream(detokenizer, generated)) == "Hello there!"


def test_window_stays_small(tokenizer: Any) -> None:
    seen: list[int] = []

    class Recording:
        """Forwards to the real tokenizer, remembering how many ids each decode got."""

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            seen.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer.encode(" ".join(TEXTS * 20), add_special_tokens=False)
    assert len(ids) > 2000
    prompt = tokenizer.encode("Write a long multilingual story:", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(Recording(), prompt_ids=prompt)
    text = "".join(stream(detokenizer, ids))
    assert text == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)) :]
    # Bounded by the longest byte-fallback run (18 byte tokens for the family emoji) plus the
    # previous emission as context, not by the 2000+ ids streamed.
    assert max(seen) <= 48


def test_detokenize_matches_streaming(tokenizer: Any) -> None:
    ids = tokenizer.encode(" ".join(TEXTS))
    for skip, spaces in FLAGS:
        streamed = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=skip, spaces_between_special_tokens=spaces
        )
        expected = "".join(stream(streamed, ids))
        assert detokenize(tokenizer, ids, None, skip, spaces) == expected
