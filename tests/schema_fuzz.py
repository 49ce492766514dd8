"""Hypothesis strategies for request bodies, read from data/ChatCompletionRequest.schema.json.

`valid_bodies()` draws bodies the schema accepts (the server may still refuse
some on rules the schema cannot express); `invalid_bodies()` mutates them
into bodies the schema rejects, checked with the schema's own validator;
`corrupt_bytes()` damages serialized bodies at the byte level.

The schema uses a small vocabulary (type, properties, required,
additionalProperties, anyOf, const, enum, items, maxItems, min/maxLength,
minimum, maximum, exclusiveMinimum, $ref into $defs), which is all this
generator understands. Sizes are kept small so that every generated request
is cheap to serve: a fuzz run is about coverage of shapes, not of lengths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import cache
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from flashserve.api.endpoints.request_schema import load_schema


def fuzz_examples(default: int) -> int:
    """Examples per property: FLASHSERVE_FUZZ_EXAMPLES, else the module's `default`."""
    return int(os.environ.get("FLASHSERVE_FUZZ_EXAMPLES", str(default)))


def fuzz_settings(examples: int, *health_checks: HealthCheck) -> settings:
    """Derandomized (FLASHSERVE_FUZZ_RANDOM=1 draws fresh examples), no example database,
    and no complaint about slow or large draws (nor about `health_checks`)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=os.environ.get("FLASHSERVE_FUZZ_RANDOM") != "1",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *health_checks],
    )


MAX_ITEMS = 3
MAX_TEXT = 24

# Top-level fields drawn from narrower strategies than the schema allows: output
# length drives the cost of a request, and a few well-formed templates reach the
# renderer where random text would mostly stop at a syntax error.
TEMPLATES = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
    "{% if tools %}tools: {{ tools | length }}{% endif %}{{ messages[-1].content }}",
    "plain text, no variables",
)
OVERRIDES: dict[str, st.SearchStrategy] = {
    "max_tokens": st.integers(1, 4),
    "min_tokens": st.integers(0, 4),
    "truncate_prompt_tokens": st.integers(1, 64),
    "top_logprobs": st.integers(0, 5),
    "chat_template": st.one_of(st.sampled_from(TEMPLATES), st.text(max_size=MAX_TEXT)),
}
# Fields whose schema type is much wider than what the server accepts: drawn from the
# accepted range half of the time so that more bodies get past validation and are
# served, and from the whole schema type the other half.
ACCEPTED = {
    "n": st.just(1),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "min_p": st.floats(0, 1),
    "top_p_min": st.just(0),
    "top_k": st.integers(-1, 50),
    "bad_token_ids": st.lists(st.integers(0, 32767), max_size=MAX_ITEMS),
    "stop_token_ids": st.lists(st.integers(0, 32767), max_size=MAX_ITEMS),
    "logit_bias": st.dictionaries(
        st.integers(0, 32767).map(str), st.floats(-100, 100), max_size=MAX_ITEMS
    ),
}

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=MAX_TEXT),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=MAX_ITEMS),
        st.dictionaries(st.text(max_size=8), inner, max_size=MAX_ITEMS),
    ),
    max_leaves=8,
)


@cache
def schema() -> Mapping[str, Any]:
    return load_schema()


@cache
def validator() -> Draft202012Validator:
    return Draft202012Validator(schema())


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), ref
        node = {
            **schema()["$defs"][ref.removeprefix("#/$defs/")],
            **{k: v for k, v in node.items() if k != "$ref"},
        }
    return node


def from_schema(node: Mapping[str, Any]) -> st.SearchStrategy:
    """Values that `node` accepts."""
    node = _resolve(node)
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "anyOf" in node:
        return st.one_of([from_schema(branch) for branch in node["anyOf"]])
    kind = node.get("type")
    if kind == "object":
        return _object(node)
    if kind == "array":
        size = min(node.get("maxItems", MAX_ITEMS), MAX_ITEMS)
        return st.lists(from_schema(node.get("items", {})), max_size=size)
    if kind == "string":
        low = node.get("minLength", 0)
        return st.text(
            min_size=low, max_size=max(low, min(node.get("maxLength", MAX_TEXT), MAX_TEXT))
        )
    if kind == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if kind == "number":
        low = node.get("exclusiveMinimum", node.get("minimum"))
        return st.floats(
            min_value=low,
            max_value=node.get("maximum"),
            exclude_min="exclusiveMinimum" in node,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES  # no constraint: any JSON value


def _object(node: Mapping[str, Any]) -> st.SearchStrategy:
    properties = node.get("properties", {})
    required = set(node.get("required", ()))
    fields = {name: from_schema(sub) for name, sub in properties.items()}
    extra = node.get("additionalProperties", True)
    if properties:
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )
    if extra is False:
        return st.just({})
    values = JSON_VALUES if extra is True else from_schema(extra)
    return st.dictionaries(st.text(max_size=8), values, max_size=MAX_ITEMS)


def _top_level() -> st.SearchStrategy[dict[str, Any]]:
    root = schema()
    # Always bounded: without max_tokens a request runs to the end of the context.
    required = {*root["required"], "max_tokens"}
    fields = {
        name: OVERRIDES[name] if name in OVERRIDES else _field(name, sub)
        for name, sub in root["properties"].items()
    }
    messages = st.lists(
        from_schema(root["properties"]["messages"]["items"]), min_size=1, max_size=MAX_ITEMS
    )
    fields["messages"] = messages
    return st.fixed_dictionaries(
        {k: v for k, v in fields.items() if k in required},
        optional={k: v for k, v in fields.items() if k not in required},
    )


def _field(name: str, node: Mapping[str, Any]) -> st.SearchStrategy:
    generic = from_schema(node)
    return st.one_of(ACCEPTED[name], generic) if name in ACCEPTED else generic


def _keep_shared_state_clean(body: dict[str, Any]) -> dict[str, Any]:
    # A context_only request parks its KV blocks for a minute on the shared test
    # server, where later tests count free blocks.
    params = body.get("disaggregated_params")
    if isinstance(params, dict) and params.get("request_type") == "context_only":
        body = {**body, "disaggregated_params": {**params, "request_type": "generation_only"}}
    return body


def valid_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return _top_level().map(_keep_shared_state_clean)


# -- invalid bodies ------------------------------------------------------------------

OUT_OF_RANGE = {
    "max_tokens": [0, -1, 262145],
    "temperature": [-0.5, 4.5],
    "top_p": [0, 1.5],
    "best_of": [0, 2],
    "truncate_prompt_tokens": [0, -3],
    "stop": ["", [""], ["x"] * 33, "s" * 1001],
}


@st.composite
def invalid_bodies(draw: st.DrawFn) -> Any:
    """A valid body with one mutation that the schema rejects."""
    body = dict(draw(valid_bodies()))
    root = schema()
    mutation = draw(
        st.sampled_from(
            [
                "unknown_key",
                "wrong_type",
                "drop_required",
                "out_of_range",
                "bad_message",
                "not_object",
            ]
        )
    )
    if mutation == "unknown_key":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in root["properties"]))
        body[key] = draw(JSON_VALUES)
    elif mutation == "wrong_type":
        name = draw(st.sampled_from(sorted(root["properties"])))
        # Explicit nulls on optional fields mean "not set" to the server: not a mutation.
        body[name] = draw(JSON_VALUES.filter(lambda v: v is not None))
    elif mutation == "drop_required":
        del body[draw(st.sampled_from(sorted(root["required"])))]
    elif mutation == "out_of_range":
        name = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        body[name] = draw(st.sampled_from(OUT_OF_RANGE[name]))
    elif mutation == "bad_message":
        broken = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"role": st.text(max_size=8), "content": st.text(max_size=8)}
                ),
                st.fixed_dictionaries({"content": st.text(max_size=8)}),
                JSON_SCALARS,
                st.lists(JSON_SCALARS, max_size=2),
            )
        )
        messages = list(body["messages"])
        messages[draw(st.integers(0, len(messages) - 1))] = broken
        body["messages"] = messages
    else:
        return draw(st.one_of(JSON_SCALARS, st.lists(JSON_VALUES, max_size=MAX_ITEMS)))
    return body


def is_valid(body: Any) -> bool:
    return validator().is_valid(body)


# -- byte-level damage -----------------------------------------------------------------


@st.composite
def corrupt_bytes(draw: st.DrawFn) -> bytes:
    """A valid body, serialized, then truncated, spliced with random bytes, or byte-flipped."""
    raw = json.dumps(draw(valid_bodies()), ensure_ascii=draw(st.booleans())).encode()
    at = draw(st.integers(0, len(raw)))
    damage = draw(st.sampled_from(["truncate", "insert", "flip"]))
    if damage == "truncate":
        return raw[:at]
    if damage == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    at = min(at, len(raw) - 1)
    return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
