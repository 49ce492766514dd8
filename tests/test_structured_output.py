"""Structured outputs (response_format) are always valid, even from a random-weight model.

A random model unconstrained writes noise; with the grammar mask every output must parse
and validate. Requests are batched into one engine run per tokenizer (fast on 2 cores), are
sampled at temperature 1.0 to walk many grammar paths, and must all end with finish_reason
"stop": max_tokens is far above the longest output these schemas allow in practice.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import jsonschema
import pytest
import torch
from fastapi import HTTPException

from flashserve.api.detokenizer import special_token_ids
from flashserve.api.errors import RequestError
from flashserve.api.structured_output import StructuredOutputs, parse_response_format
from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.structured import GrammarCompilerCache, GrammarSpec, StructuredGrammar
from tests.chat_harness import call, content, make_service, streamed_content
from tests.tiny_models import save_tiny_llama

pytest_plugins = ["tests.tokenizer_fixtures"]

EOS = 2
MAX_TOKENS = 400
PER_SCHEMA = 15  # x 14 schemas = 210 requests
PER_OTHER = 12  # json_object, each grammar, the structural tag

# -- what is asked for ----------------------------------------------------------

POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9},
        "y": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["x", "y"],
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 6},
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["name", "id"],
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
    },
    "array_bounds": {
        "type": "object",
        "properties": {
            "scores": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L", 1, None]},
        },
        "required": ["color", "size"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -5, "maximum": 5},
            "b": {"type": "string", "maxLength": 4},
            "c": {"type": "boolean"},
        },
        "required": ["a"],
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": -10, "maximum": 10},
            "y": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        },
        "required": ["x", "y"],
    },
    "patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        },
        "required": ["code", "zip"],
    },
    "formats": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "day": {"type": "string", "format": "date"},
        },
        "required": ["id", "day"],
    },
    "defs_ref": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "v": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 5},
                    {"type": "null"},
                    {"enum": ["x", "y"]},
                ]
            }
        },
        "required": ["v"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["a", "b"]}, "on": {"type": "boolean"}},
            "required": ["k", "on"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "const_matrix": {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 1},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            },
        },
        "required": ["version", "matrix"],
    },
    "recursive_ref": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "next": {"$ref": "#/$defs/node"},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "dice": {"type": "integer", "minimum": 1, "maximum": 6},
    "closed_object": {
        "title": "Flag",
        "type": "object",
        "properties": {"ok": {"type": "boolean", "description": "whether it worked"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
}
NOT_STRICT = {"closed_object"}  # schemas sent without strict: true

# Formats xgrammar enforces exactly; its "date" is lexical (it accepts 2024-02-30), which
# jsonschema's calendar check would reject, so dates are checked by their shape below.
FORMATS = jsonschema.FormatChecker(formats=["uuid", "ipv6", "email"])
DATE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")

SQL_GRAMMAR = r"""
root ::= "SELECT " cols " FROM " table where? ";"
cols ::= col (", " col){0,2}
col ::= "id" | "name" | "age"
table ::= "users" | "orders"
where ::= " WHERE " col " = " [0-9] [0-9]? [0-9]?
"""
SQL = re.compile(
    r"^SELECT (id|name|age)(, (id|name|age)){0,2} FROM (users|orders)"
    r"( WHERE (id|name|age) = [0-9]{1,3})?;$"
)

ARITHMETIC_GRAMMAR = r"""
root ::= term ((" + " | " - ") term){0,3}
term ::= num | "(" num ((" + " | " * ") num){0,2} ")"
num ::= [1-9] [0-9]?
"""
_NUM = r"[1-9][0-9]?"
_TERM = rf"({_NUM}|\({_NUM}(( \+ | \* ){_NUM}){{0,2}}\))"
ARITHMETIC = re.compile(rf"^{_TERM}(( \+ | - ){_TERM}){{0,3}}$")

QUERY_GRAMMAR = r"""
root ::= pair ("&" pair){0,3}
pair ::= key "=" value
key ::= [a-z] [a-z0-9_]{0,5}
value ::= "true" | "false" | [A-Za-z0-9]{1,6}
"""
QUERY = re.compile(
    r"^[a-z][a-z0-9_]{0,5}=[A-Za-z0-9]{1,6}(&[a-z][a-z0-9_]{0,5}=[A-Za-z0-9]{1,6}){0,3}$"
)

GRAMMARS = {
    "sql": (SQL_GRAMMAR, SQL),
    "arithmetic": (ARITHMETIC_GRAMMAR, ARITHMETIC),
    "query": (QUERY_GRAMMAR, QUERY),
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "celsius": {"type": "integer", "minimum": -40, "maximum": 50},
    },
    "required": ["city", "celsius"],
}
STRUCTURAL_TAG = {
    "type": "structural_tag",
    "format": {
        "type": "sequence",
        "elements": [
            {"type": "const_string", "value": "Result: "},
            {
                "type": "or",
                "elements": [
                    {
                        "type": "tag",
                        "begin": "<weather>",
                        "content": {
                            "type": "json_schema",
                            "json_schema": WEATHER,
                            "max_whitespace_cnt": 1,
                        },
                        "end": "</weather>",
                    },
                    {
                        "type": "tag",
                        "begin": "<time>",
                        "content": {"type": "regex", "pattern": "[0-2][0-9]:[0-5][0-9]"},
                        "end": "</time>",
                    },
                ],
            },
        ],
    },
}
# DOTALL: JSON inside the tag may hold whitespace (max_whitespace_cnt), newlines included.
TAG_OUTPUT = re.compile(
    r"^Result: (<weather>(.*)</weather>|<time>[0-2][0-9]:[0-5][0-9]</time>)$", re.DOTALL
)


def check_tag_output(text: str) -> None:
    match = TAG_OUTPUT.match(text)
    assert match, text
    if match.group(2) is not None:
        jsonschema.validate(json.loads(match.group(2)), WEATHER)


# -- running them ---------------------------------------------------------------


def spec_for(response_format: dict[str, Any]) -> GrammarSpec:
    spec = parse_response_format(response_format)
    assert spec is not None
    return spec


def schema_format(name: str) -> dict[str, Any]:
    json_schema: dict[str, Any] = {"name": name, "schema": SCHEMAS[name]}
    if name not in NOT_STRICT:
        json_schema["strict"] = True
    return {"type": "json_schema", "json_schema": json_schema}


def closing_bias(tokenizer: Any) -> dict[int, float]:
    """Favour tokens that close strings and objects.

    Any JSON object includes strings of any length, which a random model would rarely
    close (one token in hundreds contains a quote); a bias makes them short and shows the
    mask composing with logit_bias.
    """
    closers = {'"', '"}', "}", '",', '"},', '"]'}
    bias = {}
    for token, i in tokenizer.get_vocab().items():
        if token.lstrip("▁Ġ") in closers:
            bias[i] = 9.0
    return bias


class Harness:
    """One engine over a tiny random Llama whose vocabulary matches a real tokenizer."""

    def __init__(self, tokenizer: Any, model_dir: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        # The API's entry point, so invalid formats surface as the RequestError users get.
        self.outputs = StructuredOutputs(tokenizer, vocab_size, (EOS,))
        self.compiler = self.outputs.compiler()

    def engine(self, **overrides: Any) -> LLMEngine:
        settings: dict[str, Any] = dict(
            device="cpu", dtype="float32", kv_cache_memory_gb=0.1, max_model_len=1024
        )
        settings.update(overrides)
        return LLMEngine(EngineConfig(**settings), self.model_dir, eos_token_ids=(EOS,))

    def grammar(self, response_format: dict[str, Any]) -> StructuredGrammar:
        return self.outputs.compile(spec_for(response_format))

    def run(
        self, requests: dict[str, tuple[list[int], SamplingParams]], engine: LLMEngine | None = None
    ) -> dict[str, tuple[list[int], str | None]]:
        """Run all requests in one engine; (output tokens, finish_reason) per request."""
        engine = engine or self.engine()
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        out: dict[str, list[int]] = {rid: [] for rid in requests}
        finish: dict[str, str | None] = {}
        while engine.has_work():
            for o in engine.step():
                out[o.request_id].extend(o.new_token_ids)
                if o.finished:
                    finish[o.request_id] = o.finish_reason
        return {rid: (out[rid], finish.get(rid)) for rid in requests}

    def text(self, tokens: list[int], finish: str | None) -> str:
        if finish == "stop":
            assert tokens[-1] == EOS
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def prompt(i: int) -> list[int]:
    # Distinct prompts: the random model's distribution depends on them.
    return [1, 5 + (i * 37) % 3000, 100 + (i * 91) % 20000, 7]


def sampled(grammar: StructuredGrammar, **fields: Any) -> SamplingParams:
    fields = {"temperature": 1.0, "max_tokens": MAX_TOKENS, **fields}
    return SamplingParams(grammar=grammar, **fields)


def build_mix(
    harness: Harness, schemas: list[str], per_schema: int, per_other: int, grammars: list[str]
) -> dict[str, tuple[list[int], SamplingParams]]:
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    n = 0
    for name in schemas:
        grammar = harness.grammar(schema_format(name))
        for _ in range(per_schema):
            requests[f"schema:{name}:{n}"] = (prompt(n), sampled(grammar))
            n += 1
    json_object = harness.grammar({"type": "json_object"})
    bias = closing_bias(harness.tokenizer)
    for _ in range(per_other):
        requests[f"object:{n}"] = (prompt(n), sampled(json_object, logit_bias=bias))
        n += 1
    for name in grammars:
        grammar = harness.grammar({"type": "grammar", "grammar": GRAMMARS[name][0]})
        for _ in range(per_other):
            requests[f"grammar:{name}:{n}"] = (prompt(n), sampled(grammar))
            n += 1
    tag = harness.grammar({"type": "structural_tag", "structural_tag": json.dumps(STRUCTURAL_TAG)})
    for _ in range(per_other):
        requests[f"tag:{n}"] = (prompt(n), sampled(tag))
        n += 1
    return requests


def check_output(rid: str, text: str) -> None:
    kind, _, rest = rid.partition(":")
    name = rest.rpartition(":")[0]
    if kind == "schema":
        value = json.loads(text)
        jsonschema.validate(value, SCHEMAS[name], format_checker=FORMATS)
        if name == "formats":
            assert DATE.match(value["day"]), text
    elif kind == "object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "grammar":
        assert GRAMMARS[name][1].match(text), text
    elif kind == "tag":
        check_tag_output(text)
    else:
        raise AssertionError(rid)


def assert_all_valid(harness: Harness, results: dict[str, tuple[list[int], str | None]]) -> None:
    failures = []
    for rid, (tokens, finish) in results.items():
        text = harness.text(tokens, finish)
        try:
            assert finish == "stop", f"finish_reason {finish}"
            check_output(rid, text)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append(f"{rid}: {text[:120]!r}: {str(exc)[:200]}")
    assert not failures, f"{len(failures)} of {len(results)} invalid:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def sp(sp_tokenizer, tmp_path_factory) -> Harness:
    vocab = len(sp_tokenizer)  # 32,768
    model = save_tiny_llama(tmp_path_factory.mktemp("sp-llama"), vocab_size=vocab)
    return Harness(sp_tokenizer, model, vocab)


@pytest.fixture(scope="module")
def sp_results(sp) -> dict[str, tuple[list[int], str | None]]:
    """All SentencePiece requests in one engine run, as one batch."""
    torch.manual_seed(0)
    requests = build_mix(sp, list(SCHEMAS), PER_SCHEMA, PER_OTHER, list(GRAMMARS))
    return sp.run(requests, sp.engine(max_num_seqs=512))


# -- validity -------------------------------------------------------------------


def test_json_schema_outputs_all_validate(sp, sp_results):
    schema_results = {k: v for k, v in sp_results.items() if k.startswith("schema:")}
    assert len(schema_results) >= 200
    assert_all_valid(sp, schema_results)
    # Temperature 1.0 explores: the outputs are not one string repeated.
    texts = {sp.text(*v) for v in schema_results.values()}
    assert len(texts) > 120


def test_json_object_outputs_are_json_objects(sp, sp_results):
    assert_all_valid(sp, {k: v for k, v in sp_results.items() if k.startswith("object:")})


def test_json_object_without_bias_is_an_object_or_a_valid_prefix(sp):
    """Unbiased, a random model may write one endless string: cut by max_tokens, what it
    wrote so far is still a prefix the grammar accepts; what finished is an object."""
    grammar = sp.grammar({"type": "json_object"})
    torch.manual_seed(2)
    results = sp.run({f"r{i}": (prompt(i), sampled(grammar, max_tokens=24)) for i in range(8)})
    for tokens, finish in results.values():
        if finish == "stop":
            assert isinstance(json.loads(sp.text(tokens, finish)), dict)
        else:
            assert finish == "length"
            matcher = grammar.new_matcher()
            assert all(matcher.accept_token(t) for t in tokens)


def test_ebnf_grammar_outputs_parse(sp, sp_results):
    results = {k: v for k, v in sp_results.items() if k.startswith("grammar:")}
    assert len(results) == PER_OTHER * len(GRAMMARS)
    assert_all_valid(sp, results)


def test_structural_tag_outputs_match_the_tag(sp, sp_results):
    assert_all_valid(sp, {k: v for k, v in sp_results.items() if k.startswith("tag:")})


def test_byte_level_bpe_tokenizer(bpe_tokenizer, tmp_path_factory):
    vocab = len(bpe_tokenizer)  # 131,072
    model = save_tiny_llama(tmp_path_factory.mktemp("bpe-llama"), vocab_size=vocab)
    harness = Harness(bpe_tokenizer, model, vocab)
    torch.manual_seed(1)
    schemas = ["nested", "enums", "patterns", "defs_ref", "array_of_objects"]
    results = harness.run(build_mix(harness, schemas, 3, 3, ["sql", "query"]))
    assert_all_valid(harness, results)


def test_unconstrained_random_model_writes_noise(sp):
    """The control: without the mask the same model does not write JSON."""
    torch.manual_seed(0)
    results = sp.run(
        {f"r{i}": (prompt(i), SamplingParams(temperature=1.0, max_tokens=16)) for i in range(4)}
    )
    for tokens, finish in results.values():
        with pytest.raises(ValueError):
            json.loads(sp.text(tokens, finish))


# -- engine behaviour -----------------------------------------------------------


def test_unconstrained_requests_are_unaffected_by_constrained_neighbours(sp):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = {f"plain{i}": (prompt(1000 + i), greedy) for i in range(4)}
    alone = sp.run(plain)
    nested = sp.grammar(schema_format("nested"))
    constrained = {
        f"json{i}": (
            prompt(2000 + i),
            SamplingParams(temperature=0.0, max_tokens=200, grammar=nested),
        )
        for i in range(3)
    }
    together = sp.run({**plain, **constrained})
    for rid in plain:
        assert together[rid] == alone[rid]
    # Constrained greedy rows are also the same alone and in company.
    for rid, request in constrained.items():
        assert sp.run({rid: request})[rid] == together[rid]
        assert together[rid][1] == "stop"


def test_preemption_does_not_refeed_the_matcher(sp):
    """Recompute after preemption replays output tokens through the model, not the grammar."""
    grammar = sp.grammar(schema_format("defs_ref"))
    requests = {
        f"r{i}": (
            [1] + [5 + (i * 13 + j) % 30000 for j in range(60)],
            SamplingParams(temperature=0.0, max_tokens=200, grammar=grammar),
        )
        for i in range(8)
    }
    expected = sp.run(requests)
    # 20 blocks of 16 tokens cannot hold 8 sequences of ~90 tokens: preemptions happen.
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    engine = sp.engine(kv_cache_memory_gb=20 * block_bytes / (1 << 30), enable_prefix_caching=False)
    got = sp.run(requests, engine)
    assert engine.scheduler.total_preemptions > 0
    assert got == expected
    assert_all_valid(sp, {f"schema:defs_ref:{rid}": v for rid, v in got.items()})


def test_max_tokens_cut_ends_with_length_and_a_valid_prefix(sp):
    grammar = sp.grammar(schema_format("nested"))
    results = sp.run({"r": (prompt(1), sampled(grammar, max_tokens=5))})
    tokens, finish = results["r"]
    assert finish == "length" and len(tokens) == 5
    matcher = grammar.new_matcher()
    assert all(matcher.accept_token(t) for t in tokens)
    assert not matcher.is_terminated()


def test_grammar_wins_over_min_tokens_and_ignore_eos(sp):
    """EOS is allowed only when the grammar can end; then it ends the output, whatever
    min_tokens or ignore_eos say, because anything after it would break the format."""
    grammar = sp.grammar(schema_format("dice"))
    results = sp.run(
        {
            "min_tokens": (prompt(1), sampled(grammar, min_tokens=50)),
            "ignore_eos": (prompt(2), sampled(grammar, ignore_eos=True)),
        }
    )
    for tokens, finish in results.values():
        assert finish == "stop"
        assert 1 <= json.loads(sp.text(tokens, finish)) <= 6


def test_bans_that_leave_no_grammar_token_fall_back_to_the_grammar(sp):
    grammar = sp.grammar(schema_format("enums"))
    brace = [i for t, i in sp.tokenizer.get_vocab().items() if t.startswith(("{", "▁{"))]
    results = sp.run({"r": (prompt(3), sampled(grammar, bad_token_ids=tuple(brace)))})
    tokens, finish = results["r"]
    assert finish == "stop"
    jsonschema.validate(json.loads(sp.text(tokens, finish)), SCHEMAS["enums"])


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


def test_invalid_schema_is_rejected_before_any_token(sp):
    """Through the service: 400 from create(), and the engine never saw the request."""
    service = make_service()
    try:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
        with pytest.raises(HTTPException) as info:
            call(service, _body(response_format=bad))
        assert info.value.status_code == 400
        assert info.value.detail["param"] == "response_format.json_schema.schema"
        assert service.engine.engine.steps == 0
    finally:
        service.engine.shutdown()


# -- through the chat API -------------------------------------------------------


def _body(**fields: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Give me JSON."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 1.0,
        **fields,
    }


@pytest.fixture(scope="module")
def service():
    service = make_service()
    yield service
    service.engine.shutdown()


def test_chat_api_streaming_logprobs_and_sampling_controls(service):
    schema_name = "array_of_objects"
    fmt = schema_format(schema_name)
    controls = dict(top_p=0.9, top_k=40, min_p=0.01, presence_penalty=0.5, seed=7)
    full = call(service, _body(response_format=fmt, logprobs=True, top_logprobs=2, **controls))
    text = content(full)
    jsonschema.validate(json.loads(text), SCHEMAS[schema_name])
    choice = full["choices"][0]
    assert choice["finish_reason"] == "stop"
    entries = choice["logprobs"]["content"]
    # Alternatives come from the masked distribution: where the grammar allows one token,
    # there is no second alternative (masked tokens are never listed).
    assert entries and all(1 <= len(e["top_logprobs"]) <= 2 for e in entries)
    assert any(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["logprob"] > float("-inf") for e in entries)

    events = call(service, _body(response_format=fmt, stream=True, **controls))
    assert json.loads(streamed_content(events)) == json.loads(text)  # same seed, same output
    finals = [e for e in events if isinstance(e, dict) and e.get("choices")]
    assert finals[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_api_stop_strings_still_cut_the_output(service):
    fmt = schema_format("const_matrix")
    out = call(service, _body(response_format=fmt, stop=['"matrix"'], seed=1))
    assert content(out) == '{"version": 2, '
    assert out["choices"][0]["finish_reason"] == "stop"


def test_slow_compile_does_not_stall_other_requests(service, monkeypatch):
    original = service.structured.compile
    compiled_at: list[float] = []

    def slow_compile(spec):
        time.sleep(2.0)  # a huge schema
        compiled_at.append(time.monotonic())
        return original(spec)

    monkeypatch.setattr(service.structured, "compile", slow_compile)
    finished: dict[str, float] = {}

    async def one(name: str, body: dict[str, Any]) -> None:
        await service.create(body)
        finished[name] = time.monotonic()

    async def both() -> None:
        slow = asyncio.create_task(one("slow", _body(response_format=schema_format("dice"))))
        await asyncio.sleep(0.05)  # the slow compile has started
        await one("plain", _body(max_tokens=4))
        await slow

    asyncio.run(both())
    # The plain request was served while the schema was still compiling.
    assert finished["plain"] < compiled_at[0] < finished["slow"]
