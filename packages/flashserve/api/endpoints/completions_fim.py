"""Fill-in-the-middle prompts: `prompt` (the prefix) and `suffix` -> one token sequence.

Which layout a model was trained on shows in its tokenizer: FIM models carry their
markers as single special tokens. The known layouts are tried in order and the first
whose markers are all single tokens wins; a tokenizer with none cannot do FIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PREFIX = "{prefix}"
SUFFIX = "{suffix}"


@dataclass(frozen=True)
class FimFormat:
    """A layout: marker tokens and the PREFIX / SUFFIX slots, in prompt order."""

    name: str
    layout: tuple[str, ...]

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(part for part in self.layout if part not in (PREFIX, SUFFIX))


FORMATS = (
    # Qwen2.5-Coder, CodeGemma: prefix-suffix-middle.
    FimFormat("qwen", ("<|fim_prefix|>", PREFIX, "<|fim_suffix|>", SUFFIX, "<|fim_middle|>")),
    # StarCoder, Granite Code.
    FimFormat("starcoder", ("<fim_prefix>", PREFIX, "<fim_suffix>", SUFFIX, "<fim_middle>")),
    FimFormat("deepseek", ("<｜fim▁begin｜>", PREFIX, "<｜fim▁hole｜>", SUFFIX, "<｜fim▁end｜>")),
    # Mistral (Codestral; mistral-common's encode_fim): suffix first, the middle follows
    # the prefix directly.
    FimFormat("mistral", ("[SUFFIX]", SUFFIX, "[PREFIX]", PREFIX)),
)


def find_fim_format(tokenizer: Any) -> tuple[FimFormat, dict[str, int]] | None:
    """The tokenizer's FIM layout and its markers' ids, or None if it has none."""
    for fim in FORMATS:
        ids = {marker: _single_token(tokenizer, marker) for marker in fim.markers}
        if all(token is not None for token in ids.values()):
            return fim, ids  # type: ignore[return-value]
    return None


def _single_token(tokenizer: Any, text: str) -> int | None:
    token = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(token, int) or token == tokenizer.unk_token_id:
        return None
    return token if tokenizer.convert_ids_to_tokens(token) == text else None


def assemble(
    fim: FimFormat, marker_ids: dict[str, int], prefix_ids: list[int], suffix_ids: list[int]
) -> list[int]:
    """The FIM prompt's ids (without the tokenizer's BOS, which goes first)."""
    out: list[int] = []
    for part in fim.layout:
        if part == PREFIX:
            out.extend(prefix_ids)
        elif part == SUFFIX:
            out.extend(suffix_ids)
        else:
            out.append(marker_ids[part])
    return out
