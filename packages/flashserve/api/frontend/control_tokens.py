"""Request text never becomes a control token.

A chat template writes its markup (`<|im_start|>`, `[INST]`, `</s>`) and the request's
text (messages, names, tool definitions and results, documents, chat_template_args) into
one string. Tokenized with special tokens parsed, a user's literal "<|im_end|>" would
become the real end-of-turn token and could open a forged system or assistant turn. So:

1. `shield` replaces every special-token string inside the request's values, before
   rendering, with a marker: private-use characters around a number, which templates
   carry through as plain text (`| tojson` included; with `ensure_ascii=True` the
   marker is escaped and stays visible as text, never a token).
2. `resolve` puts the strings back into the rendered text and records where they are:
   a `PromptText`, the prompt as a `str` plus those character ranges.
3. `encode` tokenizes a `PromptText` with those ranges as text and every other special
   string as its token. A prompt whose request text holds no special-token string is
   tokenized exactly as before, by the tokenizer itself.

"Special" is what the tokenizer flags special (the flag `split_special_tokens` and
`skip_special_tokens` honour). Added tokens that a tokenizer marks ordinary (Qwen's
`<think>`, `<tool_call>`) stay the tokens they are, in request text too.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

# Marks a shielded string: MARK, its index in the request's table, MARK. Request text
# that holds MARK itself is shielded too, so every MARK in the rendered text is ours.
MARK = "\ue000"
_MARKER = re.compile(f"{MARK}(\\d+){MARK}")
# Stand-ins for the template's own special tokens (see _StandInEncoder): plane 16's
# private-use characters, one per special token.
_STAND_IN_BASE = 0x100000
_STAND_IN_LIMIT = 0x10FFFE


class PromptText(str):
    """A rendered prompt that remembers where request text spelled special tokens.

    `request_specials` holds the (start, end) character ranges that must tokenize as
    text. It is a `str` so that everything reading the prompt (the output plan, length
    checks, logs) keeps working; string operations on it give plain `str` again.
    """

    request_specials: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, request_specials: tuple[tuple[int, int], ...] = ()) -> PromptText:
        prompt = super().__new__(cls, text)
        prompt.request_specials = tuple(request_specials)
        return prompt

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the template jail's pipe
        return (PromptText, (str(self), self.request_specials))


class ControlTokens:
    """One tokenizer's special-token strings: shielding request values, encoding prompts."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids = special_token_strings(tokenizer)
        self._pattern = _literal_pattern([*self.ids, MARK])
        self._genuine = _literal_pattern(list(self.ids)) if self.ids else None
        self._stand_ins: _StandInEncoder | None | bool = False  # False: not built yet
        self._lock = threading.Lock()

    def shield(self, value: Any, table: list[str]) -> Any:
        """`value` (a request's string, list or dict, nested) with every special-token
        string replaced by a marker; the replaced strings are appended to `table`."""
        if isinstance(value, str):
            if not self.ids and MARK not in value:
                return value

            def mark(match: re.Match[str]) -> str:
                table.append(match.group())
                return f"{MARK}{len(table) - 1}{MARK}"

            return self._pattern.sub(mark, value)
        if isinstance(value, dict):
            return {self.shield(k, table): self.shield(v, table) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.shield(item, table) for item in value)
        return value

    def resolve(self, rendered: str, table: list[str]) -> PromptText:
        """The rendered text with the shielded strings back, and their ranges."""
        if MARK not in rendered:
            return PromptText(rendered)
        pieces: list[str] = []
        ranges: list[tuple[int, int]] = []
        length = 0
        last = 0
        for match in _MARKER.finditer(rendered):
            index = int(match.group(1))
            if index >= len(table):  # not one of ours (a request template wrote it): text
                continue
            original = table[index]
            pieces.append(rendered[last : match.start()])
            length += match.start() - last
            pieces.append(original)
            ranges.append((length, length + len(original)))
            length += len(original)
            last = match.end()
        pieces.append(rendered[last:])
        return PromptText("".join(pieces), tuple(ranges))

    def encode(self, prompt: str, add_special_tokens: bool) -> list[int]:
        """The prompt's token ids: the request's special-token strings as text."""
        ranges = getattr(prompt, "request_specials", ())
        if not ranges:
            return self.tokenizer.encode(str(prompt), add_special_tokens=add_special_tokens)
        segments = self._segments(str(prompt), ranges)
        encoder = self._stand_in_encoder()
        if encoder is not None and not encoder.conflicts(str(prompt)):
            return encoder.encode(segments, add_special_tokens)
        return self._encode_pieces(segments, add_special_tokens)

    def _segments(self, text: str, ranges: tuple[tuple[int, int], ...]) -> list[tuple[str, bool]]:
        """The text as (piece, is_template_special) pairs: the template's own special
        tokens found outside the request's ranges, everything else text."""
        out: list[tuple[str, bool]] = []
        last = 0
        for start, end in [*ranges, (len(text), len(text))]:
            out.extend(self._split_genuine(text[last:start]))
            if end > start:
                out.append((text[start:end], False))
            last = end
        return [piece for piece in out if piece[0]]

    def _split_genuine(self, text: str) -> list[tuple[str, bool]]:
        if self._genuine is None:
            return [(text, False)]
        out, last = [], 0
        for match in self._genuine.finditer(text):
            out.append((text[last : match.start()], False))
            out.append((match.group(), True))
            last = match.end()
        out.append((text[last:], False))
        return out

    def _stand_in_encoder(self) -> _StandInEncoder | None:
        with self._lock:
            if self._stand_ins is False:
                self._stand_ins = _StandInEncoder.build(self.tokenizer, self.ids)
            return self._stand_ins  # type: ignore[return-value]

    def _encode_pieces(
        self, segments: list[tuple[str, bool]], add_special_tokens: bool
    ) -> list[int]:
        # Tokenizers without a `tokenizers` backend: each text piece on its own. Exact for
        # byte-level BPE; a SentencePiece piece after a special token may gain a "▁".
        tokenizer = self.tokenizer
        ids = tokenizer.encode("", add_special_tokens=True) if add_special_tokens else []
        for piece, special in segments:
            if special:
                ids.append(self.ids[piece])
            else:
                ids.extend(
                    tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
                )
        return ids


class _StandInEncoder:
    """A private copy of the tokenizer's `tokenizers` backend in which each special token
    has a stand-in: a one-character ordinary added token with the same matching rules.

    The template's special tokens are written as their stand-ins and the copy encodes with
    special tokens unparsed, so the request's special strings are text while every split,
    normalization and pre-tokenization happens exactly as the original would do it on the
    whole prompt (a SentencePiece "▁" prefix, for instance, depends on where a piece
    starts). The stand-ins' ids are then mapped back to the special tokens' ids.
    """

    def __init__(self, backend: Any, stand_ins: dict[str, str], id_map: dict[int, int]) -> None:
        self.backend = backend
        self.stand_ins = stand_ins
        self.id_map = id_map
        self._conflict = re.compile(
            f"[{chr(_STAND_IN_BASE)}-{chr(_STAND_IN_BASE + max(len(stand_ins) - 1, 0))}]"
        )

    @classmethod
    def build(cls, tokenizer: Any, ids: dict[str, int]) -> _StandInEncoder | None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not ids or _STAND_IN_BASE + len(ids) > _STAND_IN_LIMIT:
            return None
        from tokenizers import AddedToken, Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = True
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        stand_ins = {content: chr(_STAND_IN_BASE + k) for k, content in enumerate(ids)}
        copy.add_tokens(
            [
                AddedToken(
                    stand_in,
                    single_word=bool(getattr(proto, "single_word", False)),
                    lstrip=bool(getattr(proto, "lstrip", False)),
                    rstrip=bool(getattr(proto, "rstrip", False)),
                    normalized=bool(getattr(proto, "normalized", False)),
                    special=False,
                )
                for content, stand_in in stand_ins.items()
                for proto in [decoder.get(ids[content])]
            ]
        )
        id_map: dict[int, int] = {}
        for content, stand_in in stand_ins.items():
            stand_in_id = copy.token_to_id(stand_in)
            if stand_in_id is None:
                return None
            id_map[stand_in_id] = ids[content]
        return cls(copy, stand_ins, id_map)

    def conflicts(self, text: str) -> bool:
        """True if the prompt itself holds stand-in characters (they would read as tokens)."""
        return self._conflict.search(text) is not None

    def encode(self, segments: list[tuple[str, bool]], add_special_tokens: bool) -> list[int]:
        text = "".join(self.stand_ins[piece] if special else piece for piece, special in segments)
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return [self.id_map.get(i, i) for i in ids]


def special_token_strings(tokenizer: Any) -> dict[str, int]:
    """Text -> id of every token the tokenizer parses as special: its added tokens flagged
    special (transformers 5 lists only bos/eos/unk/pad in `all_special_tokens`)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out = {
        str(token.content): int(i)
        for i, token in added.items()
        if getattr(token, "special", False) and str(token.content)
    }
    encoder = getattr(tokenizer, "added_tokens_encoder", None) or {}
    for text in getattr(tokenizer, "all_special_tokens", ()) or ():
        if text and text in encoder and text not in out:
            out[text] = int(encoder[text])
    return out


def _literal_pattern(strings: list[str]) -> re.Pattern[str]:
    """A regex matching any of `strings`, leftmost-longest (as the tokenizer's own added-token
    matcher does), built as a trie so that a thousand reserved tokens stay cheap to scan."""
    trie: dict[str, Any] = {}
    for text in strings:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(build(trie))


_CACHE: weakref.WeakKeyDictionary[Any, ControlTokens] = weakref.WeakKeyDictionary()


def control_tokens(tokenizer: Any) -> ControlTokens:
    """The tokenizer's ControlTokens, built once per tokenizer object.

    No lock: the template jail's forked child calls this too, and a lock some other
    thread held at the fork would stay held in the child. Two threads racing on a new
    tokenizer both build one, which is only wasted work.
    """
    try:
        return _CACHE[tokenizer]
    except KeyError:
        found = _CACHE[tokenizer] = ControlTokens(tokenizer)
        return found
    except TypeError:  # not weak-referenceable
        return ControlTokens(tokenizer)
