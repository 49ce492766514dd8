"""Stop-string matching over streamed text deltas.

The matcher runs an Aho-Corasick automaton over the stop strings one character at a time,
so each character costs O(1) amortised however many stops there are, and it never looks at
text again once that text is emitted. It holds back the text that could still be the start
of a stop, which is never longer than the longest stop, so a stop is never streamed in part.

Semantics: the stop that occurs first in the text wins (earliest start; of several stops
starting at the same place, the shortest). That makes the result independent of how the
text is cut into deltas. One consequence: once "bc" has matched inside "abc", the matcher
still waits for the next character when "abcd" is also a stop, because "abcd" would start
earlier; the caller may see up to ``len(longest stop)`` more characters before the match.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class _Automaton:
    goto: tuple[dict[str, int], ...]  # node -> {char: child}; node 0 is the root
    fail: tuple[int, ...]  # longest proper suffix of the node's string that is a node
    match_len: tuple[int, ...]  # longest stop that is a suffix of the node's string, or 0
    partial_len: tuple[int, ...]  # longest suffix that is a proper prefix of some stop


@functools.lru_cache(maxsize=64)
def _build_automaton(stops: tuple[str, ...]) -> _Automaton:
    # Cached per stop set: clients tend to send the same stop lists on every request.
    goto: list[dict[str, int]] = [{}]
    depth = [0]
    terminal = [False]
    for stop in stops:
        node = 0
        for ch in stop:
            child = goto[node].get(ch)
            if child is None:
                child = len(goto)
                goto[node][ch] = child
                goto.append({})
                depth.append(depth[node] + 1)
                terminal.append(False)
            node = child
        terminal[node] = True

    fail = [0] * len(goto)
    match_len = [0] * len(goto)
    partial_len = [0] * len(goto)
    queue: deque[int] = deque()
    for child in goto[0].values():
        queue.append(child)
    # Breadth-first, so a node's failure target (shallower) is complete before the node.
    while queue:
        node = queue.popleft()
        match_len[node] = depth[node] if terminal[node] else match_len[fail[node]]
        partial_len[node] = depth[node] if goto[node] else partial_len[fail[node]]
        for ch, child in goto[node].items():
            target = fail[node]
            while target and ch not in goto[target]:
                target = fail[target]
            fail[child] = goto[target].get(ch, 0)
            queue.append(child)
    return _Automaton(tuple(goto), tuple(fail), tuple(match_len), tuple(partial_len))


class StopStringMatcher:
    """Streams text through while watching for stop strings.

    ``feed(delta)`` returns ``(text safe to emit now, matched stop or None)``. After a match
    the returned text ends right before the stop (or after it with
    ``include_stop_str_in_output``) and further input is ignored. ``flush()`` releases what
    is held back when generation ends without a match.
    """

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False) -> None:
        # Empty stops would match everywhere; duplicates change nothing.
        unique = tuple(sorted({s for s in stops if s}))
        self._automaton = _build_automaton(unique) if unique else None
        self._include_stop = include_stop_str_in_output
        self._node = 0
        self._buffer = ""  # text received but not emitted yet
        self._buffer_start = 0  # absolute offset of _buffer[0] in the whole text
        self._best_start = -1  # start of the earliest complete stop seen, -1 if none
        self._best_len = 0
        self._finished = False
        self.matched: str | None = None
        """The stop string that ended the text, once one has (also set by ``flush``)."""

    @property
    def finished(self) -> bool:
        """True once a stop matched or ``flush`` was called; later input is ignored."""
        return self._finished

    @property
    def watching(self) -> bool:
        """Stop strings were given and none has ended the text yet."""
        return self._automaton is not None and not self._finished

    def feed(self, delta: str) -> tuple[str, str | None]:
        if self._finished:
            return "", None
        if self._automaton is None:
            return delta, None
        goto, fail = self._automaton.goto, self._automaton.fail
        match_len, partial_len = self._automaton.match_len, self._automaton.partial_len
        node = self._node
        end = self._buffer_start + len(self._buffer)
        live_start = end - partial_len[node]
        self._buffer += delta
        for ch in delta:
            while node and ch not in goto[node]:
                node = fail[node]
            node = goto[node].get(ch, 0)
            end += 1
            if match_len[node]:
                start = end - match_len[node]
                if self._best_start < 0 or start < self._best_start:
                    self._best_start, self._best_len = start, match_len[node]
            live_start = end - partial_len[node]
            # A stop that is still being completed could start before the best match: wait.
            if self._best_start >= 0 and live_start >= self._best_start:
                return self._finish()
        self._node = node
        boundary = live_start if self._best_start < 0 else min(live_start, self._best_start)
        cut = boundary - self._buffer_start
        emit, self._buffer = self._buffer[:cut], self._buffer[cut:]
        self._buffer_start = boundary
        return emit, None

    def flush(self) -> str:
        """Release the held-back text at the end of generation.

        If a stop had matched but a longer stop starting earlier was still possible, that
        match now stands: the text before it is returned and ``matched`` is set.
        """
        if self._finished:
            return ""
        if self._best_start >= 0:
            return self._finish()[0]
        self._finished = True
        emit, self._buffer = self._buffer, ""
        return emit

    def _finish(self) -> tuple[str, str]:
        offset = self._best_start - self._buffer_start
        stop = self._buffer[offset : offset + self._best_len]
        emit = self._buffer[: offset + self._best_len if self._include_stop else offset]
        self._buffer = ""
        self._finished = True
        self.matched = stop
        return emit, stop
