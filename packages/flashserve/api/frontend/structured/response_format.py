"""`response_format` -> the compiled grammar that `SamplingParams.grammar` carries.

Parsing and checking the request is cheap; compiling can take long (large schemas), so
it runs where the request is prepared, on a worker thread: the event loop keeps serving
and the engine thread never compiles. Anything invalid is a 400 naming the field, raised before the
request reaches the engine. docs/structured-outputs.md describes what each type accepts.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import torch

from flashserve.api.frontend.output.detokenizer import special_token_ids
from flashserve.api.frontend.output.reasoning import END as THINK_END
from flashserve.api.frontend.structured.json_grammar import json_ebnf
from flashserve.api.frontend.structured.subschemas import child_schemas
from flashserve.api.frontend.structured.thinking import FREE, OPEN, ThinkingFormats
from flashserve.api.http.errors import RequestError
from flashserve.engine.structured import (
    EBNF,
    JSON_OBJECT,
    JSON_SCHEMA,
    STRUCTURAL_TAG,
    GrammarCompilerCache,
    GrammarSpec,
    InvalidGrammarError,
    StructuredGrammar,
    token_level,
)

SCHEMA_PARAM = "response_format.json_schema.schema"
_PARAM_BY_KIND = {
    JSON_OBJECT: "response_format",
    "json_schema": SCHEMA_PARAM,
    EBNF: "response_format.grammar",
    STRUCTURAL_TAG: "response_format.structural_tag",
}

# Keywords xgrammar 0.2.8 accepts but does not enforce (checked by sampling its masks at
# random: outputs broke them). A strict schema must not rely on them.
_UNENFORCED_KEYWORDS = (
    "allOf",
    "oneOf",  # enforced as anyOf: more than one branch may match
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "$dynamicRef",
    "$recursiveRef",
)
# String formats xgrammar turns into a pattern; any other format is an unconstrained string.
_ENFORCED_FORMATS = frozenset(
    "date time date-time duration uuid ipv4 ipv6 hostname email uri uri-reference "
    "uri-template json-pointer relative-json-pointer".split()
)
# The top-level type of a structural tag definition; anything else is a bare format.
_TAG_WRAPPER = "structural_tag"


class StructuredOutputs:
    """Turns a request's response_format into a compiled grammar for one model."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...], capacity: int = 256
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.capacity = capacity
        self._compiler: GrammarCompilerCache | None = None
        self._compiler_lock = threading.Lock()
        self._row_lock = threading.Lock()
        self.thinking = ThinkingFormats(tokenizer)
        self._row_after_thinking: torch.Tensor | None | bool = False  # False: not built yet

    def grammar_for(
        self, response_format: dict[str, Any] | None, thinking: str | None = None
    ) -> StructuredGrammar | None:
        """The compiled grammar response_format asks for (None: unconstrained), or a
        RequestError (400) naming what is wrong. Blocking: call it off the event loop.

        `thinking` is the prompt's reasoning state (frontend/output/reasoning.py). With
        "open" or "free" the grammar constrains the answer after the thinking block, which
        stays free text; a grammar or structural tag that spells "</think>" itself
        describes the whole output and applies from the first token.
        """
        spec = parse_response_format(response_format)
        if spec is None:
            return None
        if thinking in (OPEN, FREE) and not describes_thinking(spec):
            return self._after_thinking(spec, thinking)
        return self.compile(spec)

    def compile(self, spec: GrammarSpec, kind: str | None = None) -> StructuredGrammar:
        """`spec` compiled; errors name the response_format field of `kind` (spec's own)."""
        param = _PARAM_BY_KIND[kind or spec.kind]
        try:
            return self.compiler().compile(spec)
        except InvalidGrammarError as exc:
            raise RequestError(
                f"{param} cannot be compiled: {exc}", param=param, code="invalid_response_format"
            ) from exc

    def _after_thinking(self, spec: GrammarSpec, thinking: str) -> StructuredGrammar:
        try:
            answer = answer_format(spec)
        except InvalidGrammarError as exc:
            param = _PARAM_BY_KIND[spec.kind]
            raise RequestError(
                f"{param} cannot be compiled: {exc}", param=param, code="invalid_response_format"
            ) from exc
        tag = {"type": _TAG_WRAPPER, "format": self.thinking.after_thinking(answer, thinking)}
        wrapped = GrammarSpec(STRUCTURAL_TAG, json.dumps(tag, separators=(",", ":")))
        grammar = self.compile(wrapped, kind=spec.kind)
        if spec.kind == STRUCTURAL_TAG and token_level(spec.source):
            return dataclasses.replace(grammar, allowed=None)  # the tag places tokens itself
        return dataclasses.replace(grammar, allowed=self._thinking_row())

    def _thinking_row(self) -> torch.Tensor | None:
        """Special tokens banned (as for every grammar) but the think tags, where special."""
        with self._row_lock:
            if self._row_after_thinking is False:
                banned = set(special_token_ids(self.tokenizer) - self.thinking.special_tags())
                self._row_after_thinking = self.compiler().allowed_row(banned)
            return self._row_after_thinking  # type: ignore[return-value]

    def compiler(self) -> GrammarCompilerCache:
        # Built on first use, not at load: replicas that never see a structured request
        # skip xgrammar's import and vocabulary scan.
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = GrammarCompilerCache(
                    self.tokenizer,
                    self.vocab_size,
                    self.stop_token_ids,
                    special_token_ids(self.tokenizer),
                    capacity=self.capacity,
                )
            return self._compiler


def describes_thinking(spec: GrammarSpec) -> bool:
    """A grammar or structural tag that spells the think end tag places the block itself."""
    return spec.kind in (EBNF, STRUCTURAL_TAG) and THINK_END in spec.source


def answer_format(spec: GrammarSpec) -> dict[str, Any]:
    """The structural-tag format of the answer `spec` asks for (compact JSON for the
    JSON kinds, as when they compile on their own)."""
    if spec.kind == JSON_OBJECT:
        return {"type": "grammar", "grammar": json_ebnf('{"type":"object"}', strict=False)}
    if spec.kind == JSON_SCHEMA:
        return {"type": "grammar", "grammar": json_ebnf(spec.source, strict=spec.strict)}
    if spec.kind == EBNF:
        return {"type": "grammar", "grammar": spec.source}
    if spec.kind == STRUCTURAL_TAG:
        return json.loads(spec.source)["format"]
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


def parse_response_format(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """The grammar a response_format asks for (None: unconstrained); RequestError if invalid."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == JSON_OBJECT:
        return GrammarSpec(JSON_OBJECT)
    if kind == "json_schema":
        return _json_schema_spec(response_format.get("json_schema"))
    if kind == EBNF:
        grammar = response_format.get("grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise _error("response_format.grammar must be a non-empty EBNF grammar", EBNF)
        return GrammarSpec(EBNF, grammar)
    if kind == STRUCTURAL_TAG:
        return GrammarSpec(STRUCTURAL_TAG, _structural_tag_source(response_format.get(kind)))
    raise RequestError(
        f"response_format.type {kind!r} is not one of text, json_object, json_schema, "
        "grammar, structural_tag",
        param="response_format.type",
        code="invalid_response_format",
    )


def _json_schema_spec(json_schema: Any) -> GrammarSpec:
    if not isinstance(json_schema, dict) or not isinstance(json_schema.get("schema"), dict):
        raise _error(f"{SCHEMA_PARAM} must be a JSON Schema object", "json_schema")
    schema = json_schema["schema"]
    strict = json_schema.get("strict") is True
    if not isinstance(schema.get("$schema", ""), str):
        raise _error(
            f"{SCHEMA_PARAM}.$schema must be a string naming a JSON Schema dialect", "json_schema"
        )
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(["#", *map(str, exc.absolute_path)])
        raise _error(
            f"{SCHEMA_PARAM} is not a valid JSON Schema: {exc.message} (at {where})",
            "json_schema",
        ) from exc
    if strict:
        problems = list(_unenforceable(schema))
        if problems:
            listed = "; ".join(f"{what} at {where}" for where, what in problems[:5])
            raise _error(
                f"{SCHEMA_PARAM} uses keywords that constrained decoding cannot enforce "
                f"({listed}). With strict: true every keyword must hold in the output; "
                "remove them, or drop strict to have them ignored.",
                "json_schema",
            )
    return GrammarSpec.json_schema(schema, strict)


def _unenforceable(schema: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """(location, keyword) of every keyword in the schema that decoding would not enforce."""
    if not isinstance(schema, dict):
        return
    for keyword in _UNENFORCED_KEYWORDS:
        if keyword in schema:
            yield where, f"`{keyword}`"
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in _ENFORCED_FORMATS:
        yield where, f"`format: {fmt}`"
    multiple = schema.get("multipleOf")
    if multiple is not None and (schema.get("type") != "integer" or multiple != int(multiple)):
        yield where, "`multipleOf` (enforced for integer types and integer steps only)"
    for path, sub in child_schemas(schema):
        yield from _unenforceable(sub, f"{where}/{path}")


def _structural_tag_source(raw: Any) -> str:
    """The tag definition as the JSON xgrammar's compile_structural_tag takes.

    Accepted (the field holds it as a JSON string):
    - xgrammar's format: {"type": "structural_tag", "format": {...}};
    - a bare format, e.g. {"type": "triggered_tags", ...}, wrapped as above;
    - the older OpenAI-style tag list: {"structures": [{"begin", "schema", "end"}],
      "triggers": [...]}, which becomes a triggered_tags format.
    """
    param = "response_format.structural_tag"
    if isinstance(raw, str):
        try:
            tag = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _error(f"{param} is not valid JSON: {exc}", STRUCTURAL_TAG) from exc
    else:
        tag = raw
    if not isinstance(tag, dict):
        raise _error(f"{param} must hold a JSON object", STRUCTURAL_TAG)
    if "structures" in tag:
        tag = _from_tag_list(tag)
    elif tag.get("type") != _TAG_WRAPPER:
        tag = {"type": _TAG_WRAPPER, "format": tag}
    elif "format" not in tag:
        raise _error(f"{param} has type structural_tag but no format", STRUCTURAL_TAG)
    return json.dumps(tag, separators=(",", ":"))


def _from_tag_list(tag: dict[str, Any]) -> dict[str, Any]:
    structures, triggers = tag.get("structures"), tag.get("triggers")
    ok = isinstance(structures, list) and isinstance(triggers, list) and structures
    ok = ok and all(
        isinstance(s, dict) and {"begin", "schema", "end"} <= s.keys() for s in structures
    )
    if not ok:
        raise _error(
            "response_format.structural_tag: `structures` must be a non-empty list of "
            '{"begin", "schema", "end"} and `triggers` a list of strings',
            STRUCTURAL_TAG,
        )
    tags = [
        {
            "type": "tag",
            "begin": s["begin"],
            "content": {"type": "json_schema", "json_schema": s["schema"]},
            "end": s["end"],
        }
        for s in structures
    ]
    return {
        "type": _TAG_WRAPPER,
        "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags},
    }


def _error(message: str, kind: str) -> RequestError:
    return RequestError(message, param=_PARAM_BY_KIND[kind], code="invalid_response_format")
