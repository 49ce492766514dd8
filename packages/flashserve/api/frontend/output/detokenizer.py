"""Incremental detokenization for streaming responses.

Decoding one token at a time is wrong for most tokenizers: SentencePiece marks word starts
with "▁" that only becomes a space when something precedes it, and both byte fallback and
byte-level BPE can split one UTF-8 character over several tokens. So each step decodes a
short window of recent tokens and emits only the part of the text that is new, holding it
back while it could still change:

* ``prefix`` = the tokens already emitted that stay in the window as context, ``read`` = the
  start of the tokens not emitted yet; the delta is ``decode(window)[len(decode(prefix)):]``.
* hold while the text ends in U+FFFD (an incomplete byte sequence that later tokens may
  complete), and while the window ends with SentencePiece byte-fallback tokens ("<0xE4>"):
  the byte-fallback decoder turns a whole run of such tokens into U+FFFDs as soon as any
  part of it is invalid, so a run's text is final only once a non-byte token ends it.

Without prompt context, concatenating all deltas (after ``flush()``) gives exactly
``tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``,
except in the ``spaces_between_special_tokens`` case described on the class, for any ids,
however they are split into ``add_tokens`` calls.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as context: enough for leading-space rules, short to keep decodes cheap.
_MIN_CONTEXT_TOKENS = 4
_MAX_CONTEXT_TOKENS = 24


class DecodingTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the detokenizer uses."""

    @property
    def all_special_ids(self) -> list[int]: ...

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any
    ) -> str: ...

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]: ...


@dataclass(frozen=True)
class _TokenizerInfo:
    special_ids: frozenset[int]
    byte_fallback_ids: frozenset[int]


_INFO_CACHE: weakref.WeakKeyDictionary[Any, _TokenizerInfo] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: DecodingTokenizer) -> frozenset[int]:
    """Ids treated as special: ``all_special_ids`` plus every added token flagged special.

    transformers 5 lists only bos/eos/unk/pad in ``all_special_ids`` when loading a
    ``tokenizer.json``; control tokens such as ``[INST]`` are special only in
    ``added_tokens_decoder``, and that flag is what ``decode(skip_special_tokens=True)``
    honours.
    """
    return _tokenizer_info(tokenizer).special_ids


def _tokenizer_info(tokenizer: DecodingTokenizer) -> _TokenizerInfo:
    # Cached per tokenizer object (computing it walks ~1000 added tokens and decodes 256
    # byte tokens); tokens added to a tokenizer after its first use here are not seen.
    try:
        return _INFO_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    special = {int(i) for i in tokenizer.all_special_ids}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    info = _TokenizerInfo(frozenset(special), _byte_fallback_ids(tokenizer))
    try:
        _INFO_CACHE[tokenizer] = info
    except TypeError:  # not weak-referenceable: just recompute next time
        pass
    return info


def _byte_fallback_ids(tokenizer: DecodingTokenizer) -> frozenset[int]:
    # Judge by behaviour rather than by inspecting the decoder: a "<0xNN>" vocab entry is a
    # byte-fallback token exactly when decoding it does not give back its own spelling.
    names = [f"<0x{b:02X}>" for b in range(256)]
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = getattr(tokenizer, "unk_token_id", None)
    found = set()
    for name, token_id in zip(names, ids):
        if token_id is None or token_id == unk:
            continue
        if tokenizer.decode([token_id], skip_special_tokens=False) != name:
            found.add(int(token_id))
    return frozenset(found)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas that are safe to stream.

    ``prompt_ids`` gives context: the prompt's last few tokens after its last special token
    decide whether the first generated "▁word" starts with a space. A special token (for
    example ``[/INST]``) is a hard boundary: Mistral/Llama prompts encode each text segment
    between control tokens on its own, so the "▁" right after one is SentencePiece's dummy
    prefix, not a space the model meant. Without prompt context the text equals
    ``tokenizer.decode(generated_ids)``; with context tokens ``ctx`` it equals
    ``decode(ctx + generated_ids)[len(decode(ctx)):]``, e.g. " Paris" after "... is".

    Special tokens (see :func:`special_token_ids`) are dropped when ``skip_special_tokens``.
    When they are kept and ``spaces_between_special_tokens`` is True (vLLM's default), the
    text is the non-empty pieces joined by single spaces, each piece being either one special
    token or a maximal run of other tokens decoded on its own (so SentencePiece drops the run's
    leading "▁"): ``[▁Hi, </s>, ▁there]`` gives ``"Hi </s> there"``. With False, special
    tokens are decoded in line by the tokenizer, ``"Hi</s> there"``, i.e. plain ``decode``.

    Each step decodes only a window of recent tokens, so a step costs O(window), not
    O(generated length). The window grows only while text is held back (an incomplete
    character, or a byte-fallback run that has not ended).
    """

    def __init__(
        self,
        tokenizer: DecodingTokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        keep_special_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Special tokens shown even when the others are skipped: markup that an output
        # parser reads ("[TOOL_CALLS]"), which never reaches the client as text.
        self._keep_special = keep_special_ids
        # Special tokens split the text into separately decoded segments only when shown.
        self._segmented = spaces_between_special_tokens and not skip_special_tokens
        info = _tokenizer_info(tokenizer)
        self._special_ids = info.special_ids
        self._byte_ids = info.byte_fallback_ids
        self._window: list[int] = []  # context tokens, then tokens not emitted yet
        self._read = 0  # window[:read] is already emitted; window[read:] is pending
        self._prefix_text = ""  # decode(window[:read]), cached between steps
        self._pieces: list[str] = []
        self._text: str | None = ""
        self._emitted_any = False
        self._space_before_next = False  # a special token was the last thing emitted
        if prompt_ids:
            self._seed_context(prompt_ids)

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        if self._text is None:
            self._text = "".join(self._pieces)
        return self._text

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed newly generated ids; return the text that is now final (possibly "")."""
        out: list[str] = []
        for token_id in token_ids:
            if token_id in self._special_ids:
                if self._skip_special and token_id in self._keep_special:
                    out.append(self._release(final=True))
                    out.append(self._emit_kept(token_id))
                    continue
                if self._skip_special:
                    continue  # decode(skip_special_tokens=True) drops them before decoding
                if self._segmented:
                    out.append(self._release(final=True))
                    out.append(self._emit_special(token_id))
                    continue
            self._window.append(token_id)
        out.append(self._release(final=False))
        return self._record("".join(out))

    def flush(self) -> str:
        """Release held-back text at the end of generation (U+FFFD for invalid bytes)."""
        return self._record(self._release(final=True))

    def _decode(self, token_ids: list[int]) -> str:
        # Cleanup of tokenization spaces rewrites text across token boundaries, which a
        # stream cannot undo, so it is always off.
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special,
            clean_up_tokenization_spaces=False,
        )

    def _seed_context(self, prompt_ids: list[int]) -> None:
        tail = list(prompt_ids[-_MAX_CONTEXT_TOKENS:])
        for i in range(len(tail) - 1, -1, -1):
            if tail[i] in self._special_ids:
                tail = tail[i + 1 :]
                break
        if not tail or tail[-1] in self._byte_ids:
            return  # an unfinished byte run cannot serve as stable context
        # The shortest suffix that decodes cleanly: starting inside a character would put a
        # U+FFFD into the prefix text and break the prefix/delta arithmetic.
        for n in range(min(_MIN_CONTEXT_TOKENS, len(tail)), len(tail) + 1):
            context = tail[-n:]
            text = self._decode(context)
            if REPLACEMENT_CHAR not in text:
                self._window = context
                self._read = len(context)
                self._prefix_text = text
                return

    def _release(self, final: bool) -> str:
        """Emit the pending part of the window if it is final (or if ``final`` forces it)."""
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        if not final and (
            len(text) <= len(self._prefix_text)
            or text.endswith(REPLACEMENT_CHAR)
            or self._window[-1] in self._byte_ids
        ):
            return ""
        delta = text[len(self._prefix_text) :]
        pending = self._window[self._read :]
        pending_text = self._decode(pending)
        if pending_text:
            # Slide: the just-emitted tokens become the context for the next step.
            self._window, self._prefix_text = pending, pending_text
        else:
            # Tokens that decode to nothing on their own are poor context (SentencePiece
            # would strip the next token's leading space), so keep the older context too.
            self._prefix_text = text
        self._read = len(self._window)
        return self._separated(delta)

    def _emit_kept(self, token_id: int) -> str:
        # In line, without the separating spaces of _emit_special; the text after it
        # decodes on its own, as it would after any other special token.
        self._window, self._read, self._prefix_text = [], 0, ""
        return self._separated(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def _emit_special(self, token_id: int) -> str:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        # The next segment decodes on its own, like the start of a text.
        self._window, self._read, self._prefix_text = [], 0, ""
        if not text:
            return ""
        separator = " " if self._emitted_any else ""
        self._space_before_next = True
        self._emitted_any = True
        return separator + text

    def _separated(self, delta: str) -> str:
        if not delta:
            return ""
        if self._space_before_next:
            self._space_before_next = False
            delta = " " + delta
        self._emitted_any = True
        return delta

    def _record(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
            self._text = None
        return delta


def detokenize(
    tokenizer: DecodingTokenizer,
    token_ids: list[int],
    prompt_ids: list[int] | None = None,
    skip_special_tokens: bool = True,
    spaces_between_special_tokens: bool = True,
) -> str:
    """Whole-response text, identical to what streaming the same ids would produce."""
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_ids, skip_special_tokens, spaces_between_special_tokens
    )
    detokenizer.add_tokens(token_ids)
    detokenizer.flush()
    return detokenizer.text
