"""`bad` words and phrases -> the token sequences the engine must never complete.

A phrase has several tokenizations depending on what precedes it: at the very
start of the output, after a space, or glued to the previous character (after
a newline, a quote, a bracket). SentencePiece marks word starts with "▁" and
byte-level BPE with "Ġ", so these differ token by token. Each form becomes
one sequence; the engine bans a sequence's last token whenever the output so
far ends with the rest, and bans one-token forms outright.

The glued form can be a single token for a short word ("the" in "theory"),
which then is banned everywhere: `bad` means the text never appears, even
inside a longer word.
"""

from __future__ import annotations

from typing import Any

# Encoded before a phrase to get its mid-text tokenization; a newline merges
# with no letter in the tokenizers we serve, so its tokens come off cleanly.
_ANCHOR = "\n"


def bad_word_sequences(tokenizer: Any, phrases: list[str]) -> tuple[tuple[int, ...], ...]:
    """Every likely tokenization of every phrase, without duplicates, in a stable order."""
    anchor = _encode(tokenizer, _ANCHOR)
    found: dict[tuple[int, ...], None] = {}
    for phrase in phrases:
        word = phrase.strip()
        if not word:
            continue  # an empty phrase would ban nothing sensible
        forms = [_encode(tokenizer, word)]
        for lead in ("", " "):
            ids = _encode(tokenizer, _ANCHOR + lead + word)
            if ids[: len(anchor)] == anchor:
                forms.append(ids[len(anchor) :])
        for form in forms:
            if form:
                found.setdefault(tuple(form), None)
    return tuple(found)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))
