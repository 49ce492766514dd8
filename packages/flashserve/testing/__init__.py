"""Helpers for tests and tiny test models that must work without network access."""

from flashserve.testing.offline_tokenizers import (
    make_byte_level_bpe_tokenizer_dir,
    make_sentencepiece_tokenizer_dir,
)

__all__ = ["make_byte_level_bpe_tokenizer_dir", "make_sentencepiece_tokenizer_dir"]
