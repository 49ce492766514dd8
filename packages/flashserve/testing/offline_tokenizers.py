"""Real Hugging Face tokenizers built offline from files the mistral-common wheel ships.

Tests and tiny test models need genuine tokenizers (SentencePiece with byte fallback and
byte-level BPE), but nothing can be downloaded from the Hub. ``mistral-common`` carries its
tokenizer files in ``mistral_common/data/``; this module turns two of them into ordinary
tokenizer folders that ``transformers.AutoTokenizer.from_pretrained`` loads.

Both builders are byte-for-byte deterministic, so generated folders can be committed and a
test can rebuild them and compare hashes.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
import json
import shutil
from pathlib import Path
from typing import Any

SENTENCEPIECE_MODEL_FILE = "mistral_instruct_tokenizer_240323.model.v3"
TEKKEN_FILE = "tekken_240911.json"

# tekken files older than v7 carry no special-token list; mistral-common then uses this fixed
# prefix (same order as Tekkenizer.DEPRECATED_SPECIAL_TOKENS) and fills the rest of the
# special range with "<SPECIAL_{id}>" placeholders.
_TEKKEN_DEFAULT_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)  # fmt: skip
_TEKKEN_FILLER_TEMPLATE = "<SPECIAL_{id}>"


def mistral_common_data_file(name: str) -> Path:
    """Path of a file shipped in the installed ``mistral_common/data/`` folder."""
    path = Path(str(importlib.resources.files("mistral_common") / "data" / name))
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common does not ship {name} (looked at {path})")
    return path


def _write_json(path: Path, obj: Any) -> None:
    # sort_keys + fixed separators: the committed copies must hash the same on every run.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def _write_tokenizer_config(
    out_dir: Path, config: dict[str, Any], chat_template: str | None
) -> None:
    if chat_template is not None:
        config = {**config, "chat_template": chat_template}
    _write_json(out_dir / "tokenizer_config.json", config)


# --------------------------------------------------------------------------- SentencePiece


def make_sentencepiece_tokenizer_dir(out_dir: Path, chat_template: str | None = None) -> Path:
    """Write the 32,768-token Mistral v3 SentencePiece tokenizer (byte fallback) to ``out_dir``.

    The folder holds ``tokenizer.model`` (the original SentencePiece file), the fast
    ``tokenizer.json`` converted from it, and ``tokenizer_config.json``. Loading then uses the
    fast file, which is quicker than re-converting the SentencePiece model each time.
    """
    from transformers import AutoTokenizer  # heavy import; only needed while building

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "tokenizer.json"
    stale.unlink(missing_ok=True)  # otherwise AutoTokenizer would load it instead of converting
    shutil.copyfile(mistral_common_data_file(SENTENCEPIECE_MODEL_FILE), out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        # transformers 5 defaults add_bos_token to False; Mistral prompts start with <s>.
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
    }
    _write_tokenizer_config(out_dir, config, chat_template)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.save(str(out_dir / "tokenizer.json"), pretty=False)
    return out_dir


# --------------------------------------------------------------------------- byte-level BPE


def _byte_to_unicode() -> list[str]:
    """The reversible GPT-2 byte -> printable character table used by ByteLevel tokenizers.

    Bytes that are already printable Latin-1 stand for themselves; the other 68 bytes are
    shifted to code points from U+0100 upwards, in byte order, so no token string contains
    whitespace or control characters.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


_BYTE_CHARS = _byte_to_unicode()


def _bytes_to_token_str(data: bytes) -> str:
    return "".join(_BYTE_CHARS[b] for b in data)


@functools.lru_cache(maxsize=4)
def _load_tekken(path: str) -> tuple[tuple[bytes, ...], dict[str, Any], tuple[str, ...]]:
    """(token bytes by rank, config, special token strings) of a tekken file."""
    data = json.loads(Path(path).read_text("utf-8"))
    config = data["config"]
    ranks = tuple(base64.b64decode(entry["token_bytes"]) for entry in data["vocab"])
    for rank, entry in enumerate(data["vocab"]):
        if entry["rank"] != rank:
            raise ValueError(f"{path}: vocab entry {rank} has rank {entry['rank']}")
    num_special = config["default_num_special_tokens"]
    listed = data.get("special_tokens")
    if listed:
        named = [t["token_str"] for t in sorted(listed, key=lambda t: t["rank"])]
    else:
        named = list(_TEKKEN_DEFAULT_SPECIALS)
    specials = named + [
        _TEKKEN_FILLER_TEMPLATE.format(id=i) for i in range(len(named), num_special)
    ]
    return ranks, config, tuple(specials)


@functools.lru_cache(maxsize=4)
def _tekken_merges(path: str) -> tuple[tuple[int, int, int], ...]:
    """BPE merges of a tekken vocabulary as (rank of result, left rank, right rank), rank order.

    tiktoken's BPE repeatedly joins the adjacent pair whose concatenation has the lowest rank.
    So a token of rank r is built by exactly one final join: the two pieces that this greedy
    process leaves when it runs on the token's own bytes with only ranks below r available.
    Listing those joins ordered by r gives an HF merges table that picks the same pair at
    every step. Only ranks below r matter for token r, so the table for a vocabulary cut to
    its first N ranks is a prefix of the full one; caching the full table serves every limit.
    """
    ranks, _, _ = _load_tekken(path)
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    merges: list[tuple[int, int, int]] = []
    for rank in range(256, len(ranks)):
        parts = [bytes([b]) for b in ranks[rank]]
        while len(parts) > 2:
            best_rank, best_at = rank, -1
            for i in range(len(parts) - 1):
                joined = rank_of.get(parts[i] + parts[i + 1], rank)
                if joined < best_rank:
                    best_rank, best_at = joined, i
            if best_at < 0:
                break  # not reachable by merging; encoding can still emit it as a whole word
            parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
        if len(parts) == 2:
            merges.append((rank, rank_of[parts[0]], rank_of[parts[1]]))
    return tuple(merges)


def tekken_num_special_tokens(path: Path | None = None) -> int:
    """How many special ids precede the byte-level ranks (HF id = rank + this)."""
    _, config, _ = _load_tekken(str(path or mistral_common_data_file(TEKKEN_FILE)))
    return int(config["default_num_special_tokens"])


def build_tekken_backend(vocab_limit: int | None = None, path: Path | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to mistral-common's Tekkenizer for ``path``.

    Ids 0..num_special-1 are the special tokens, ``num_special + rank`` the byte-level ranks,
    exactly like Tekkenizer. ``vocab_limit`` keeps only the first N byte-level ranks (default:
    as many as the file's ``default_vocab_size`` allows).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    key = str(path or mistral_common_data_file(TEKKEN_FILE))
    ranks, config, specials = _load_tekken(key)
    num_special = len(specials)
    kept = config["default_vocab_size"] - num_special if vocab_limit is None else vocab_limit
    if not 256 <= kept <= len(ranks):
        raise ValueError(f"vocab_limit must be in [256, {len(ranks)}], got {kept}")

    vocab = {token: i for i, token in enumerate(specials)}
    for rank in range(kept):
        token = _bytes_to_token_str(ranks[rank])
        if token in vocab:
            raise ValueError(f"byte-level token {token!r} collides with a special token")
        vocab[token] = num_special + rank
    merges = [
        (_bytes_to_token_str(ranks[left]), _bytes_to_token_str(ranks[right]))
        for result, left, right in _tekken_merges(key)
        if result < kept
    ]
    # ignore_merges: like tiktoken, a pre-tokenized piece that is itself a vocab entry becomes
    # that single token without running BPE on it.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(config["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = specials[1]
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
    )
    return tokenizer


def make_byte_level_bpe_tokenizer_dir(
    out_dir: Path, chat_template: str | None = None, vocab_limit: int | None = None
) -> Path:
    """Write mistral-common's tekken (tiktoken-style) tokenizer as an HF byte-level BPE folder.

    ``tokenizer.json`` + ``tokenizer_config.json`` (``PreTrainedTokenizerFast``). Ids match
    Tekkenizer's: specials first (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``[INST]``=3, ...,
    ``<pad>``=11), then byte-level rank r at id 1000 + r.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = build_tekken_backend(vocab_limit)
    backend.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    _write_tokenizer_config(out_dir, config, chat_template)
    return out_dir
