"""Constrained decoding with xgrammar: compiled grammars, per-sequence matchers, batch masks.

Three pieces, each used by a different thread:

* `GrammarCompilerCache` (API worker threads): one xgrammar compiler per tokenizer, and an
  LRU of compiled grammars keyed by their content, so a schema sent a thousand times is
  compiled once. Compiling can take long; it never runs on the engine thread.
* `StructuredGrammar` (what `SamplingParams.grammar` holds): a compiled grammar plus the
  tokens it must never emit; the engine makes a cheap `GrammarMatcher` from it when it
  admits the sequence. The matcher advances only on newly sampled tokens, so preemption and
  recompute (which re-run the prompt and past output through the model) never touch it.
* `apply_grammar_bitmask` (engine thread, from the logits processors): fills one token
  bitmask for all constrained rows of the batch in one call, then applies it in one call on
  the logits' device.

xgrammar is imported lazily: it costs ~2 s to import, and a replica that never sees a
structured request should not pay it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

    from flashserve.engine.logits_processors import LogitsBatch
    from flashserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

# The kinds of `response_format` that constrain decoding.
JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
EBNF = "grammar"
STRUCTURAL_TAG = "structural_tag"

# Structural-tag formats that name tokens directly (often special ones); a tag using any of
# them must be able to emit special tokens, so those are not banned for it.
_TOKEN_LEVEL_FORMATS = re.compile(
    r'"type"\s*:\s*"(token|exclude_token|any_tokens|token_triggered_tags|token_dispatch)"'
)
# "[09:28:31] /project/cpp/grammar_parser.cc:820: " and "Check failed: (...) is false: ".
_XGR_LOCATION = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")
_XGR_CHECK = re.compile(r"Check failed: \(.*?\) is false:\s*")


class InvalidGrammarError(ValueError):
    """The schema, grammar or tag cannot be compiled; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What to constrain to, in a form that is its own cache key.

    `source` is the text xgrammar compiles: canonical JSON (key order kept: xgrammar emits
    object properties in the schema's order) for schemas and tags, the grammar as sent for
    EBNF, "" for json_object.
    """

    kind: str
    source: str = ""
    strict: bool = False

    @classmethod
    def json_schema(cls, schema: dict[str, Any], strict: bool) -> GrammarSpec:
        return cls(JSON_SCHEMA, json.dumps(schema, separators=(",", ":")), strict)


@dataclass(eq=False)
class StructuredGrammar:
    """A compiled grammar shared by every request with the same spec."""

    spec: GrammarSpec
    compiled: xgr.CompiledGrammar
    # Extra tokens this grammar must never emit, as a [words] bitmask row (1 = allowed), or
    # None. See GrammarCompilerCache.allowed_row for why.
    allowed: torch.Tensor | None = None

    def new_matcher(self) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compiled)


class GrammarCompilerCache:
    """Compiles grammars for one tokenizer and model; thread-safe; keeps the last `capacity`."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        special_token_ids: Iterable[int] = (),
        capacity: int = 256,
        max_threads: int = 2,
    ) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        if not self.stop_token_ids:
            raise ValueError("structured outputs need at least one stop (EOS) token id")
        # vocab_size is the model's (its lm_head rows), which may exceed the tokenizer's: the
        # bitmask must cover every logit, and ids beyond the tokenizer are never allowed.
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
        )
        # Our own LRU below keys by content; xgrammar's cache would only duplicate it.
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False
        )
        self.capacity = capacity
        self._cache: OrderedDict[GrammarSpec, StructuredGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._special_ids = set(special_token_ids) - set(self.stop_token_ids)
        self._no_special = self.allowed_row(self._special_ids)
        self._json_safe = self.allowed_row(self._special_ids | self._control_byte_ids())

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def compile(self, spec: GrammarSpec) -> StructuredGrammar:
        """The compiled grammar for `spec`, from the cache or compiled now (slow: call off the
        engine thread). Raises InvalidGrammarError with xgrammar's reason."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        # Compile outside the lock so one slow schema does not hold up the others; two
        # threads racing on the same new spec both compile it, which is only wasted work.
        grammar = StructuredGrammar(spec, self._compile(spec), self._allowed_for(spec))
        with self._lock:
            self._cache[spec] = grammar
            self._cache.move_to_end(spec)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        compiler = self._compiler
        try:
            if spec.kind == JSON_OBJECT:
                # {"type": "object"} without strict mode is any JSON object; unlike xgrammar's
                # builtin JSON grammar it honours any_whitespace=False (see below).
                return compiler.compile_json_schema(
                    {"type": "object"}, any_whitespace=False, strict_mode=False
                )
            if spec.kind == JSON_SCHEMA:
                # any_whitespace=False: compact JSON only. With free whitespace a weak (or
                # random) model can write spaces and newlines until max_tokens runs out.
                return compiler.compile_json_schema(
                    spec.source, any_whitespace=False, strict_mode=spec.strict
                )
            if spec.kind == EBNF:
                return compiler.compile_grammar(spec.source)
            if spec.kind == STRUCTURAL_TAG:
                return compiler.compile_structural_tag(spec.source)
        except (RuntimeError, ValueError) as exc:
            raise InvalidGrammarError(clean_xgrammar_message(str(exc))) from exc
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    def _allowed_for(self, spec: GrammarSpec) -> torch.Tensor | None:
        if spec.kind in (JSON_OBJECT, JSON_SCHEMA):
            return self._json_safe
        if spec.kind == STRUCTURAL_TAG and token_level(spec.source):
            return None
        return self._no_special

    def allowed_row(self, banned: set[int]) -> torch.Tensor | None:
        """A [words] bitmask row allowing every token except `banned`.

        Special tokens (control tokens like [INST]) are banned because the grammar sees
        their text ("[INST]") while the response drops them (skip_special_tokens): a string
        could then fail its minLength or pattern once detokenized. Stop tokens stay allowed;
        the grammar decides when they may come.
        """
        import xgrammar as xgr

        banned = {i for i in banned if 0 <= i < self.vocab_size} - set(self.stop_token_ids)
        if not banned:
            return None
        row = xgr.allocate_token_bitmask(1, self.vocab_size)[0]
        ids = torch.tensor(sorted(banned), dtype=torch.int64)
        words = ids // 32
        # Bits of one word OR together, so clear them one word at a time (scatter would
        # keep only one id per word).
        clear = torch.zeros_like(row).index_put_((words,), _bit(ids % 32), accumulate=True)
        return row & ~clear

    def _control_byte_ids(self) -> set[int]:
        """Tokens whose text holds a byte below 0x20.

        Compact JSON (any_whitespace=False) never contains one: inside strings control
        characters must be escaped ("\\n" is two printable bytes). xgrammar 0.2.8's string
        rule for strings with minLength/maxLength allows raw control characters, which
        `json.loads` rejects, so they are banned here for all JSON grammars.
        """
        banned = set()
        for i, text in enumerate(self.tokenizer_info.decoded_vocab):
            if any(b < 0x20 for b in text):
                banned.add(i)
        return banned


def _bit(positions: torch.Tensor) -> torch.Tensor:
    # int32 bitmask words: bit 31 is the sign bit, so build the value in int64 and wrap.
    values = torch.ones_like(positions) << positions
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def token_level(tag_source: str) -> bool:
    """Whether a structural tag names tokens directly (then it may emit special ones)."""
    return _TOKEN_LEVEL_FORMATS.search(tag_source) is not None


def clean_xgrammar_message(message: str) -> str:
    """xgrammar's error without its C++ file/line prefix and internal assertion text."""
    first = message.strip().splitlines()[0] if message.strip() else message
    first = _XGR_LOCATION.sub("", first)
    return _XGR_CHECK.sub("", first).strip()


# -- engine side ---------------------------------------------------------------


def make_matcher(grammar: Any) -> Any:
    """A fresh matcher for a sequence being admitted (None when unconstrained)."""
    return grammar.new_matcher() if grammar is not None else None


def accept_sampled_token(seq: Sequence, token: int) -> str | None:
    """Advance the sequence's matcher by its newly sampled token; an error message if the
    grammar rejects it (the mask makes that impossible, so it means a bug, not bad input)."""
    matcher = seq.grammar_matcher
    if matcher is None or matcher.accept_token(token):
        return None
    logger.error("grammar rejected sampled token %d for %s", token, seq.request_id)
    return f"internal error: the output grammar rejected token {token}"


def grammar_terminated(seq: Sequence) -> bool:
    """True once the grammar has accepted its stop token: the output is complete."""
    return seq.grammar_matcher is not None and seq.grammar_matcher.is_terminated()


class _BatchMasker(threading.local):
    """Per-thread reusable state for filling batch bitmasks (the engine has one thread)."""

    def __init__(self) -> None:
        self.batch_matcher: Any = None
        self.buffer: torch.Tensor | None = None

    def bitmask(self, rows: int, words: int, pin: bool) -> torch.Tensor:
        buf = self.buffer
        if buf is None or buf.shape[0] < rows or buf.shape[1] != words:
            buf = torch.empty((max(rows, 64), words), dtype=torch.int32, pin_memory=pin)
            self.buffer = buf
        return buf[:rows]


_masker = _BatchMasker()


def apply_grammar_bitmask(logits: torch.Tensor, batch: LogitsBatch) -> torch.Tensor:
    """Mask, in place, every token that would break the grammar of each constrained row.

    It runs last among the logits processors. If the earlier ones' bans (bad_token_ids,
    min_tokens holding back EOS, ...) leave a row no token the grammar allows, the grammar
    wins and the row samples uniformly among the grammar's tokens: the structure is the
    guarantee.
    """
    seqs = batch.seqs
    rows = [i for i, seq in enumerate(seqs) if seq.grammar_matcher is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    if _masker.batch_matcher is None:
        _masker.batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)
    vocab = logits.shape[-1]
    words = xgr.get_bitmask_shape(1, vocab)[1]
    bitmask = _masker.bitmask(len(seqs), words, pin=logits.is_cuda)
    # A speculative position's mask was filled when its draft was checked (its matcher
    # stands at an earlier position): engine/speculative/verify.py.
    filled = {i: m for i in rows if (m := getattr(seqs[i], "grammar_bitmask", None)) is not None}
    live = [i for i in rows if i not in filled]
    if live:
        matchers = [seqs[i].grammar_matcher for i in live]
        _masker.batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, indices=live)
    for i, mask in filled.items():
        bitmask[i] = mask
    _and_allowed_rows(bitmask, seqs, rows)
    # The copy is ordered before the mask kernel on the same stream, and the buffer is not
    # refilled before this step's sampler has synchronised, so non_blocking is safe.
    device_mask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, device_mask, vocab_size=vocab, indices=rows)
    banning = [i for i in rows if _may_ban(seqs[i])]
    if banning:
        _fall_back_to_grammar(logits, device_mask, banning, vocab)
    return logits


def _and_allowed_rows(bitmask: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Clear the bits of each grammar's always-banned tokens; one op per distinct row mask."""
    groups: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for i in rows:
        allowed = seqs[i].params.grammar.allowed
        if allowed is not None:
            groups.setdefault(id(allowed), (allowed, []))[1].append(i)
    # numpy, not torch: a torch op this size fans out to the OpenMP pool, whose threads are
    # slow to wake right after xgrammar's fill (measured 5-20 ms vs 0.05 ms on 2 cores).
    words = bitmask.numpy()
    for allowed, members in groups.values():
        words[members] &= allowed.numpy()


def _may_ban(seq: Sequence) -> bool:
    """Whether earlier processors may have set some of this row's logits to -inf."""
    # logit_bias is bounded (|bias| <= 100), so it shifts logits but never removes one.
    p = seq.params
    return bool(
        p.bad_token_ids
        or p.bad_sequences
        or (p.min_tokens and seq.num_output_tokens < p.min_tokens)
    )


def _fall_back_to_grammar(
    logits: torch.Tensor, mask: torch.Tensor, rows: list[int], vocab: int
) -> None:
    """Rows with no token left get a uniform choice among the grammar's tokens."""
    import xgrammar as xgr

    dead = torch.isneginf(logits[rows]).all(dim=-1).tolist()
    dead_rows = [row for row, is_dead in zip(rows, dead) if is_dead]
    if dead_rows:
        logits[dead_rows] = 0.0
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=dead_rows)
