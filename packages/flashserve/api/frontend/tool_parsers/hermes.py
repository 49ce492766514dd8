"""Hermes / Qwen tool calls: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Used by Qwen2.5, Qwen3 and NousResearch Hermes models. Calls may come after text and
one after another (separated by a newline); the first `</tool_call>` ends a call.
"""

from __future__ import annotations

import json
from typing import Any

from flashserve.api.frontend.output.markup import safe_prefix_len
from flashserve.api.frontend.tool_parsers.base import (
    Literal,
    ToolParser,
    const,
    one_of,
    repeated,
    sequence,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = (OPEN,)
    markers = (OPEN, CLOSE)
    argument_keys = ("arguments", "parameters")

    def _parse(self, final: bool) -> None:
        while self._buffer and not self._stopped:
            buffer = self._buffer
            if self._call is None:
                at = buffer.find(OPEN)
                if at < 0:
                    keep = len(buffer) if final else safe_prefix_len(buffer, (OPEN,))
                    self._content(buffer[:keep])
                    self._buffer = buffer[keep:]
                    return
                self._content(buffer[:at])
                self._open_call(OPEN)
                self._buffer = buffer[at + len(OPEN) :]
                continue
            end = buffer.find(CLOSE)
            region = buffer if end < 0 else buffer[:end]
            if end < 0 and not final:
                region = region[: safe_prefix_len(region, (CLOSE,))]
            used = self._feed_call(region)
            self._absorb(region[used:])
            self._buffer = buffer[len(region) :]
            if end < 0:
                return
            self._buffer = self._buffer[len(CLOSE) :]
            self._close_call(CLOSE)

    @classmethod
    def call_format(
        cls, tools: list[tuple[str, dict[str, Any]]], parallel: bool, literal: Literal
    ) -> dict[str, Any]:
        calls = [
            sequence(
                literal(OPEN),
                const(f'\n{{"name": {json.dumps(name)}, "arguments": '),
                arguments,
                const("}\n"),
                literal(CLOSE),
            )
            for name, arguments in tools
        ]
        return repeated(one_of(calls), "\n", parallel)
