"""Compiling response formats: the grammar cache, strict schemas, structural-tag forms,
and the 400 that names the field of a format that does not compile.
"""

from __future__ import annotations

import json

import pytest

from flashserve.api.frontend.output.detokenizer import special_token_ids
from flashserve.api.http.errors import RequestError
from flashserve.engine.structured import GrammarCompilerCache, GrammarSpec
from tests.structured_catalogue import STRUCTURAL_TAG, WEATHER, schema_format
from tests.structured_harness import EOS, spec_for

pytest_plugins = ["tests.tokenizer_fixtures", "tests.structured_harness"]


# -- compiling ------------------------------------------------------------------


def test_compiled_grammars_are_cached_by_content_lru(sp_tokenizer):
    cache = GrammarCompilerCache(
        sp_tokenizer, len(sp_tokenizer), [EOS], special_token_ids(sp_tokenizer), capacity=2
    )
    a = cache.compile(spec_for(schema_format("dice")))
    assert cache.compile(spec_for(schema_format("dice"))) is a
    b = cache.compile(spec_for(schema_format("enums")))
    cache.compile(spec_for(schema_format("dice")))  # refresh: "enums" is now the oldest
    cache.compile(spec_for({"type": "json_object"}))
    assert cache.cache_size == 2
    assert cache.compile(spec_for(schema_format("dice"))) is a
    assert cache.compile(spec_for(schema_format("enums"))) is not b


def test_strict_forbids_properties_the_schema_does_not_list(sp):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    strict = sp.compiler.compile(GrammarSpec.json_schema(schema, strict=True))
    loose = sp.compiler.compile(GrammarSpec.json_schema(schema, strict=False))
    assert not strict.new_matcher().accept_string('{"a": 1, "b"')
    assert loose.new_matcher().accept_string('{"a": 1, "b": [true]}')


def test_structural_tag_accepts_bare_formats_and_tag_lists(sp):
    bare = STRUCTURAL_TAG["format"]
    tag_list = {
        "structures": [{"begin": "<w>", "schema": WEATHER, "end": "</w>"}],
        "triggers": ["<w>"],
    }
    for tag in (bare, tag_list):
        grammar = sp.grammar({"type": "structural_tag", "structural_tag": json.dumps(tag)})
        assert grammar.new_matcher() is not None


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integerx"}}},
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$schema": 5}}},
            "response_format.json_schema.schema",
            "$schema",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"properties": {"a": {"$ref": "#/$defs/b"}}},
                },
            },
            "response_format.json_schema.schema",
            "$defs",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}},
            },
            "response_format.json_schema.schema",
            "regex",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "strict": True,
                    "schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                },
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ({"type": "grammar", "grammar": 'root ::= "a" | '}, "response_format.grammar", "line 1"),
        ({"type": "grammar", "grammar": "root ::= missing"}, "response_format.grammar", "missing"),
        ({"type": "grammar", "grammar": 'start ::= "a"'}, "response_format.grammar", "root"),
        (
            {"type": "structural_tag", "structural_tag": "{not json"},
            "response_format.structural_tag",
            "not valid JSON",
        ),
        (
            {
                "type": "structural_tag",
                "structural_tag": json.dumps({"type": "structural_tag", "format": {"type": "x"}}),
            },
            "response_format.structural_tag",
            "not recognized",
        ),
    ],
)
def test_invalid_formats_are_400s_naming_the_field(sp, response_format, param, words):
    with pytest.raises(RequestError) as info:
        sp.grammar(response_format)
    exc = info.value
    assert exc.status == 400
    assert exc.param == param
    assert words in exc.message
    assert "/project/cpp" not in exc.message  # no C++ source locations
