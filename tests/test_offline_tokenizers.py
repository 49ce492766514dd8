"""The offline tokenizers are the real thing: same ids as their reference implementations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sentencepiece
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from transformers import AutoTokenizer

from flashserve.testing.offline_tokenizers import (
    TEKKEN_FILE,
    build_tekken_backend,
    make_byte_level_bpe_tokenizer_dir,
    make_sentencepiece_tokenizer_dir,
    mistral_common_data_file,
)

pytest_plugins = ["tests.tokenizer_fixtures"]

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\r\nwindows line",
    "Grüße aus Köln: Ärger über Öl, naïve café",
    "你好，世界！今天天气很好。",
    "こんにちは世界、カタカナとひらがな",
    "🎉 party 👨‍👩‍👧 family 🇩🇪 flag",
    "مرحبا بالعالم، كيف حالك؟",
    "ελληνικά, Русский текст, 한국어, हिन्दी",
    "1234567890 3.14159 x=-1e10 <html><b>bold</b></html>",
    "multiple   spaces\t\ttabs\n\n\nnewlines  ",
]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tekkenizer() -> Tekkenizer:
    return Tekkenizer.from_file(mistral_common_data_file(TEKKEN_FILE))


def test_sentencepiece_folder_is_mistral_v3(sp_tokenizer, sp_tokenizer_dir: Path) -> None:
    assert {p.name for p in sp_tokenizer_dir.iterdir()} == {
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert len(sp_tokenizer) == 32768
    assert (sp_tokenizer.bos_token_id, sp_tokenizer.eos_token_id) == (1, 2)
    assert sp_tokenizer.convert_ids_to_tokens([3, 4]) == ["[INST]", "[/INST]"]
    assert sp_tokenizer.encode("Hi")[0] == 1  # add_bos_token


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sp_tokenizer, sp_tokenizer_dir: Path, text: str) -> None:
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(sp_tokenizer_dir / "tokenizer.model")
    )
    assert sp_tokenizer.decode(ids) == text
    assert processor.decode(ids) == text
    if "\n    " in text:
        # Known quirk of transformers' SentencePiece -> BPE conversion: before a word, a run of
        # spaces splits as "▁▁▁▁" + "return" where sentencepiece picks "▁▁▁" + "▁return".
        # Same text, different ids.
        return
    assert ids == processor.encode(text)


def test_sentencepiece_uses_byte_fallback(sp_tokenizer) -> None:
    ids = sp_tokenizer.encode("👨", add_special_tokens=False)
    assert sp_tokenizer.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x91>", "<0xA8>"]


def test_saved_fast_tokenizer_matches_fresh_conversion(sp_tokenizer, tmp_path: Path) -> None:
    make_sentencepiece_tokenizer_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # force a conversion from tokenizer.model
    fresh = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert sp_tokenizer.encode(text) == fresh.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_matches_tekkenizer(bpe_tokenizer, tekkenizer, text: str) -> None:
    ids = bpe_tokenizer.encode(text, add_special_tokens=False)
    assert ids == tekkenizer.encode(text, bos=False, eos=False)
    assert bpe_tokenizer.decode(ids) == text


def test_byte_level_bpe_special_ids(bpe_tokenizer, tekkenizer) -> None:
    assert len(bpe_tokenizer) == tekkenizer.n_words == 131072
    specials = [tekkenizer.id_to_piece(i) for i in range(tekkenizer.num_special_tokens)]
    assert bpe_tokenizer.convert_ids_to_tokens(list(range(len(specials)))) == specials
    assert bpe_tokenizer.encode("Hi")[0] == 1
    for name in ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"]:
        token_id = bpe_tokenizer.convert_tokens_to_ids(name)
        assert token_id == tekkenizer.get_special_token(name)
        assert bpe_tokenizer.added_tokens_decoder[token_id].special
    assert bpe_tokenizer.pad_token_id == 11
    # Special tokens are kept whole in text and dropped by skip_special_tokens.
    ids = bpe_tokenizer.encode("[INST] hi [/INST]", add_special_tokens=False)
    assert ids[0] == 3 and ids[-1] == 4
    assert bpe_tokenizer.decode(ids, skip_special_tokens=True) == " hi "


def test_byte_level_bpe_vocab_limit(tmp_path: Path) -> None:
    data = json.loads(mistral_common_data_file(TEKKEN_FILE).read_text("utf-8"))
    limit = 2000
    reference = Tekkenizer(
        data["vocab"],
        list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS),
        data["config"]["pattern"],
        vocab_size=1000 + limit,
        num_special_tokens=1000,
        version=TokenizerVersion.v3,
    )
    folder = make_byte_level_bpe_tokenizer_dir(tmp_path, vocab_limit=limit)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == 1000 + limit
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, bos=False, eos=False)
        assert max(ids) < 1000 + limit
        assert tokenizer.decode(ids) == text


def test_vocab_limit_is_checked() -> None:
    with pytest.raises(ValueError):
        build_tekken_backend(vocab_limit=100)


def test_builders_are_deterministic(
    sp_tokenizer_dir: Path, bpe_tokenizer_dir: Path, tmp_path: Path
) -> None:
    from tests.tokenizer_fixtures import MISTRAL_CHAT_TEMPLATE

    sp = make_sentencepiece_tokenizer_dir(tmp_path / "sp", MISTRAL_CHAT_TEMPLATE)
    bpe = make_byte_level_bpe_tokenizer_dir(tmp_path / "bpe", MISTRAL_CHAT_TEMPLATE)
    assert _hashes(sp) == _hashes(sp_tokenizer_dir)
    assert _hashes(bpe) == _hashes(bpe_tokenizer_dir)


def test_chat_template_is_stored(bpe_tokenizer, sp_tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for tokenizer in (sp_tokenizer, bpe_tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text == "<s>[INST] Hi [/INST]"
