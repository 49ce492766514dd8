"""An engine over a tiny random Llama with a real tokenizer, for structured-output tests.

`Harness` compiles response formats the way the API does and runs batches of requests
in one engine; `build_mix` makes a batch of every kind of format in structured_catalogue,
and `assert_all_valid` checks a batch's outputs. Registered as a plugin, this module
also gives the session one `sp` harness (SentencePiece, 32,768 ids), which the tests
share: each run makes its own engine, so nothing a test does stays in it.

    pytest_plugins = ["tests.tokenizer_fixtures", "tests.structured_harness"]
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from flashserve.api.frontend.structured.response_format import (
    StructuredOutputs,
    parse_response_format,
)
from flashserve.config import EngineConfig
from flashserve.engine.llm_engine import LLMEngine
from flashserve.engine.sampling_params import SamplingParams
from flashserve.engine.structured import GrammarSpec, StructuredGrammar
from tests.structured_catalogue import GRAMMARS, STRUCTURAL_TAG, check_output, schema_format
from tests.tiny_models import save_tiny_llama

EOS = 2
MAX_TOKENS = 400


def spec_for(response_format: dict[str, Any]) -> GrammarSpec:
    spec = parse_response_format(response_format)
    assert spec is not None
    return spec


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


@pytest.fixture(scope="session")
def sp(sp_tokenizer, tmp_path_factory) -> Harness:
    vocab = len(sp_tokenizer)  # 32,768
    model = save_tiny_llama(tmp_path_factory.mktemp("sp-llama"), vocab_size=vocab)
    return Harness(sp_tokenizer, model, vocab)
