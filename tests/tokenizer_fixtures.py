"""Session-wide real tokenizers built offline (see flashserve.testing.offline_tokenizers).

Use them from a test module (or conftest.py) by registering this module as a plugin:

    pytest_plugins = ["tests.tokenizer_fixtures"]

    def test_something(sp_tokenizer, bpe_tokenizer_dir) -> None: ...

Fixtures (all session-scoped):

* ``sp_tokenizer_dir`` / ``sp_tokenizer``: Mistral v3 SentencePiece tokenizer, 32,768 ids,
  byte fallback, ``<s>``=1 ``</s>``=2 ``<unk>``=0, ``[INST]``=3 ``[/INST]``=4.
* ``bpe_tokenizer_dir`` / ``bpe_tokenizer``: byte-level BPE converted from mistral-common's
  tekken file, 131,072 ids; ids 0..999 special (``<unk>``=0 ``<s>``=1 ``</s>``=2
  ``[INST]``=3 ``[/INST]``=4 ``<pad>``=11), byte-level rank r at id 1000 + r.

The ``*_dir`` fixtures are folders that ``AutoTokenizer.from_pretrained`` loads; the others
are those tokenizers loaded. Both folders carry a minimal Mistral chat template. Treat them
as read-only: other tests share them.

``from tests.tokenizer_fixtures import *`` works too, but then every importing module gets
its own copy of the fixtures; the build is cached per process here, so that only costs the
tokenizer loading again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flashserve.testing.offline_tokenizers import (
    make_byte_level_bpe_tokenizer_dir,
    make_sentencepiece_tokenizer_dir,
)

# Mistral v1-style template: enough for tests that render chats; not the production one.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

_BUILT: dict[str, Path] = {}


def _built_dir(
    kind: str, factory: pytest.TempPathFactory, build: Callable[[Path, str], Path]
) -> Path:
    # Cached per process so that star-imports into several modules build only once.
    path = _BUILT.get(kind)
    if path is None or not (path / "tokenizer_config.json").is_file():
        path = build(factory.mktemp(f"{kind}_tokenizer"), MISTRAL_CHAT_TEMPLATE)
        _BUILT[kind] = path
    return path


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_dir("sp", tmp_path_factory, make_sentencepiece_tokenizer_dir)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _built_dir("bpe", tmp_path_factory, make_byte_level_bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
