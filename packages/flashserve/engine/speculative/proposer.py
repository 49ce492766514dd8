"""N-gram drafts: what followed the most recent earlier occurrence of the last n tokens.

Each sequence keeps an index from n-gram to the position just past its most recent
occurrence, for every n in [ngram_min, ngram_max]. It covers the n-grams that end
before the sequence's last token and grows by the new tokens at each proposal, so a
proposal costs a few dictionary look-ups, not a scan of the history.
"""

from __future__ import annotations

import weakref

from flashserve.engine.sequence import Sequence


class _NgramIndex:
    __slots__ = ("indexed_upto", "last_after")

    def __init__(self, sizes: range) -> None:
        # n-grams ending before this position are indexed.
        self.indexed_upto = 0
        # per n: n-gram -> the position right after its most recent occurrence
        self.last_after: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int, num_speculative_tokens: int) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.sizes = range(ngram_min, ngram_max + 1)
        self.k = num_speculative_tokens
        self._indexes: weakref.WeakKeyDictionary[Sequence, _NgramIndex] = (
            weakref.WeakKeyDictionary()
        )

    def propose(self, seq: Sequence, limit: int | None = None) -> list[int]:
        """Up to min(k, limit) tokens to follow seq's tokens; [] when no n-gram matches.

        The longest matching suffix wins; among its occurrences, the most recent.
        Where the occurrence's continuation runs into the suffix itself (a repeating
        pattern), the draft continues the pattern: the tokens after position i are
        read from the known tokens followed by the draft so far.
        """
        k = self.k if limit is None else min(self.k, limit)
        tokens = seq.token_ids
        if k <= 0 or len(tokens) < self.sizes.start + 1:
            return []
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = _NgramIndex(self.sizes)
        self._extend(index, tokens)
        total = len(tokens)
        for n in reversed(self.sizes):
            if n >= total:
                continue
            start = index.last_after[n].get(tuple(tokens[total - n :]))
            if start is None:
                continue
            draft: list[int] = []
            position = start
            while len(draft) < k:
                draft.append(tokens[position] if position < total else draft[position - total])
                position += 1
            return draft
        return []

    def _extend(self, index: _NgramIndex, tokens: list[int]) -> None:
        # Index every n-gram that ends before the last token (the last one is the
        # suffix being matched: its own occurrence must not count).
        end = len(tokens) - 1
        for stop in range(index.indexed_upto, end):
            for n, table in index.last_after.items():
                begin = stop - n + 1
                if begin >= 0:
                    table[tuple(tokens[begin : stop + 1])] = stop + 1
        index.indexed_upto = max(index.indexed_upto, end)

    def forget(self, seq: Sequence) -> None:
        self._indexes.pop(seq, None)
