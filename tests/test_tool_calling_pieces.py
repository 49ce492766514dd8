"""Pieces of tool calling that need no engine: the schema a tool's parameters are
compiled from, and the detokenizer keeping a format's markers.
"""

from __future__ import annotations

from flashserve.api.frontend.structured.tool_grammar import grammar_schema

pytest_plugins = ["tests.tokenizer_fixtures"]


def test_grammar_schema_bounds_strings_without_changing_what_validates() -> None:
    schema = {
        "properties": {
            "a": {"type": "string", "maxLength": 4},
            "b": {"type": "array", "items": {"type": "string", "minLength": 2}},
            "c": {"type": "string", "maxLength": 3, "enum": ["x"]},
        }
    }
    out = grammar_schema(schema)
    assert out["type"] == "object" and "type" not in schema  # the request's copy is untouched
    assert out["properties"]["a"] == {"type": "string", "pattern": '^[^"\\\\\\x00-\\x1f]{0,4}$'}
    assert out["properties"]["b"]["items"]["pattern"].endswith("{2,}$")
    assert out["properties"]["c"] == schema["properties"]["c"]


def test_detokenizer_shows_the_format_markers_it_is_told_to_keep(sp_tokenizer) -> None:
    from flashserve.api.frontend.output.detokenizer import IncrementalDetokenizer

    text = '[TOOL_CALLS] [{"name": "f", "arguments": {}}]'
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    marker = sp_tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    assert ids[0] == marker

    def run(keep: frozenset[int]) -> str:
        detok = IncrementalDetokenizer(sp_tokenizer, [1, 3, 4], keep_special_ids=keep)
        return "".join(detok.add_tokens([i]) for i in ids) + detok.flush()

    assert run(frozenset()) == '[{"name": "f", "arguments": {}}]'
    assert run(frozenset({marker})) == '[TOOL_CALLS][{"name": "f", "arguments": {}}]'
