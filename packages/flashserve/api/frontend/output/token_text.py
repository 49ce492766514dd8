"""The text and raw bytes of single tokens, for logprobs entries."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-character table, inverted.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """Maps token ids to (text, bytes) the way OpenAI's logprobs report them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab_sample = tokenizer.convert_ids_to_tokens(list(range(min(1000, len(tokenizer)))))
        self.byte_level = any(isinstance(t, str) and "Ġ" in t for t in vocab_sample)
        self._decoder = _byte_level_decoder() if self.byte_level else {}
        self.bytes_of = lru_cache(maxsize=65536)(self._bytes_of)

    def _bytes_of(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self.byte_level:
            if all(ch in self._decoder for ch in piece):
                return bytes(self._decoder[ch] for ch in piece)
            return piece.encode()
        match = _BYTE_TOKEN.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode()

    def entry(
        self, token_id: int, logprob: float, top: list[tuple[int, float]], with_top: bool
    ) -> dict:
        raw = self.bytes_of(token_id)
        body = {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }
        if with_top:
            body["top_logprobs"] = [
                {
                    "token": self.bytes_of(t).decode("utf-8", errors="replace"),
                    "logprob": lp,
                    "bytes": list(self.bytes_of(t)),
                }
                for t, lp in top
            ]
        else:
            body["top_logprobs"] = []
        return body
