"""What the tool-call parser tests share: the tools and their schemas, a parser run over
stream chunks that checks every delta as an OpenAI client expects, and `check`, which
parses a text whole, a character at a time and cut in two at every position
(tests/test_tool_parsers.py, test_tool_parsers_glm_deepseek.py)."""

from __future__ import annotations

from dataclasses import dataclass

from flashserve.api.frontend.tool_parsers import ParsedText, ToolParser

TOOLS = frozenset({"get_weather", "add", "search"})
# The tools' parameters, for GLM (whose argument values are typed by them).
SCHEMAS = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    },
    "add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "number"}}},
    "search": {
        "type": "object",
        "properties": {
            "q": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "exact": {"type": "boolean"},
            "filter": {"$ref": "#/$defs/filter"},
            "mode": {"enum": [1, 2]},
            "any": {"description": "untyped: a string is fine"},
        },
        "$defs": {"filter": {"properties": {"site": {"type": "string"}}}},
    },
}


@dataclass
class Parsed:
    content: str
    calls: list[tuple[str, str]]  # (name, arguments)
    ids: list[str]
    exhausted: bool


def run(
    parser: type[ToolParser], chunks: list[str], max_calls: int | None = None, names=TOOLS
) -> Parsed:
    p = parser(names, max_calls, SCHEMAS)
    out = ParsedText()
    seen: dict[int, str] = {}
    pieces = [p.feed(chunk) for chunk in chunks] + [p.finish()]
    for piece in pieces:
        out.content += piece.content
        for delta in piece.calls:
            body = delta.to_openai()
            if delta.index not in seen:
                # The first delta of a call says which call it is.
                assert body["id"].startswith("call_") and len(body["id"]) == 29
                assert body["type"] == "function" and body["function"]["name"]
                assert delta.index == len(seen), "calls are numbered 0, 1, 2, ..."
                seen[delta.index] = body["function"]["name"]
            else:
                assert "id" not in body and "name" not in body["function"]
                assert body["function"]["arguments"]
            out.calls.append(delta)
    calls: dict[int, list[str]] = {}
    ids = []
    for delta in out.calls:
        if delta.id is not None:
            ids.append(delta.id)
            calls[delta.index] = [delta.name, ""]
        calls[delta.index][1] += delta.arguments
    return Parsed(out.content, [tuple(c) for c in calls.values()], ids, p.exhausted)


def splits(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and cut in two at every position."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


def check(parser, text, content, calls, max_calls=None, names=TOOLS) -> None:
    for chunks in splits(text):
        got = run(parser, chunks, max_calls, names)
        assert (got.content, got.calls) == (content, calls), chunks
        assert len(set(got.ids)) == len(got.ids)


WEATHER = '{"city": "Paris", "unit": "c"}'
NESTED = '{"q": {"text": "a } b ] c \\" d", "tags": ["x", {"y": [1, 2.5e3, null, true]}]}}'
UNICODE = '{"city": "Zürich ☀️ 東京", "note": "\\u00e9"}'
