"""Hostile input: each body gets a 400 or is served, within a time bound, harming no one else.

All cases go to the real server at once, while a seeded "canary" stream runs
beside them; the canary must finish with exactly its text alone, and the server
must end idle and healthy. The server log must hold one line per request and no
prompt text.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from flashserve.api.frontend.template_jail import render_isolated
from flashserve.api.http.body import parse_json_body
from flashserve.api.http.errors import RequestError
from tests.ops_client import CHAT, engine_idle, scrape, seeded, stream_chat, wait_until

pytest_plugins = ["tests.server_fixture"]
slow = pytest.mark.slow

# Wall-clock bound per request, with every case in flight at once on two cores. A
# request's own template may run 5 s before it is killed.
BOUND_S = 20.0
OK, BAD = (200,), (400,)
EITHER = (200, 400)
HELLO = [{"role": "user", "content": "Say something about the sea."}]


@dataclass
class Case:
    name: str
    raw: bytes
    expect: tuple[int, ...]


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HELLO, "max_tokens": 4, **fields}


def case(name: str, expect: tuple[int, ...], **fields: Any) -> Case:
    return Case(name, json.dumps(body(**fields)).encode(), expect)


def raw_case(name: str, expect: tuple[int, ...], text: str) -> Case:
    return Case(name, text.encode("utf-8", "surrogatepass"), expect)


def nested(depth: int) -> str:
    """JSON text of an object nested `depth` deep (json.dumps itself would recurse too deep)."""
    return '{"a": ' * depth + "0" + "}" * depth


def nested_field(depth: int) -> str:
    return json.dumps(body(chat_template_args={})).replace("{}", nested(depth))


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def template(source: str) -> dict[str, str]:
    return {"chat_template": source}


def utf8_case(name: str, bad: bytes) -> Case:
    good = json.dumps(body(messages=[{"role": "user", "content": "@@"}])).encode()
    return Case(name, good.replace(b"@@", b"a" + bad + b"b"), BAD)


def hostile_cases() -> list[Case]:
    """Built when the test runs: some bodies are tens of megabytes."""
    return [
        # -- size and shape
        Case("deep_nesting_body", b"[" * 100_000 + b"]" * 100_000, BAD),
        raw_case("deep_nesting_field", BAD, nested_field(5000)),
        raw_case("nesting_past_guard", BAD, nested_field(100)),
        case("body_over_32_mib", BAD, messages=[{"role": "user", "content": "a" * (33 << 20)}]),
        case("prompt_of_8_mb", BAD, messages=[{"role": "user", "content": "sea " * (2 << 20)}]),
        case("200k_bad_token_ids", BAD, bad_token_ids=list(range(200_000))),
        case("50k_messages", BAD, messages=[{"role": "user", "content": "hi"}] * 50_000),
        case("stop_list_of_10k", BAD, stop=["stop"] * 10_000),
        case("stop_list_of_32_long", OK, stop=[f"{i}" + "z" * 998 for i in range(32)]),
        case("logit_bias_5k", OK, logit_bias={str(i): 1 for i in range(5000)}),
        case("logit_bias_outside_vocab", BAD, logit_bias={str(10**6 + i): 1 for i in range(3000)}),
        case("stop_token_ids_30k", OK, stop_token_ids=list(range(30_000))),
        case("user_of_1_mb", OK, user="u" * (1 << 20)),
        case("model_of_1_mb", OK, model="m" * (1 << 20)),
        case(
            "tools_3k",
            BAD,
            tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(3000)],
        ),
        # -- numbers
        raw_case("nan_literal", BAD, '{"model": "m", "messages": [], "temperature": NaN}'),
        raw_case("infinity_literal", BAD, '{"model": "m", "messages": [], "top_p": -Infinity}'),
        raw_case("float_overflow", BAD, '{"model": "m", "messages": [], "temperature": 1e999}'),
        raw_case(
            "5000_digit_int", BAD, '{"model": "m", "messages": [], "seed": ' + "9" * 5000 + "}"
        ),
        case("seed_past_64_bits", BAD, seed=2**64),
        # -- not a request at all
        Case("empty_body", b"", BAD),
        Case("array_body", b"[]", BAD),
        Case("string_body", b'"hello"', BAD),
        Case("null_body", b"null", BAD),
        Case("truncated_json", json.dumps(body()).encode()[:-3], BAD),
        # -- text encoding
        utf8_case("invalid_utf8_byte", b"\xff"),
        utf8_case("overlong_utf8", b"\xc0\xaf"),
        utf8_case("truncated_utf8", b"\xe2\x82"),
        utf8_case("utf8_encoded_surrogate", b"\xed\xa0\x80"),
        raw_case("lone_surrogate_escape", BAD, json.dumps(body(user="\ud800"), ensure_ascii=True)),
        raw_case(
            "surrogate_pair_escape",
            OK,
            json.dumps(
                body(messages=[{"role": "user", "content": "\U0001f30a"}]), ensure_ascii=True
            ),
        ),
        case(
            "control_characters",
            OK,
            messages=[{"role": "user", "content": "".join(map(chr, range(32)))}],
        ),
        case("control_chars_in_stop", OK, stop=["\x00", "\x1b[0m", "\u2028"]),
        case(
            "bidi_and_zero_width",
            OK,
            messages=[{"role": "user", "content": "\u202e\u200b\ufeff\uffff"}],
        ),
        case(
            "control_chars_in_name",
            OK,
            messages=[{"role": "user", "content": "x", "name": "\x00\n"}],
        ),
        # -- structured outputs (owned elsewhere: here only "400 or served, in bounded time")
        case(
            "regex_nested_quantifier",
            EITHER,
            response_format=json_schema(
                {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}
            ),
        ),
        case(
            "regex_alternation_blowup",
            EITHER,
            response_format=json_schema(
                {"type": "string", "pattern": "(a|aa)*(b|bb)*((a|b)+)*c{50}"}
            ),
        ),
        case(
            "regex_huge_repetition",
            EITHER,
            response_format=json_schema({"type": "string", "pattern": "(x{1000}){1000}"}),
        ),
        case(
            "schema_recursive_ref",
            EITHER,
            response_format=json_schema(
                {
                    "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}},
                    "$ref": "#/$defs/n",
                }
            ),
        ),
        case(
            "schema_enum_5k",
            EITHER,
            response_format=json_schema({"enum": [f"v{i}" for i in range(5000)]}),
        ),
        case(
            "schema_huge_min_items",
            EITHER,
            response_format=json_schema(
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 100000},
                    "minItems": 100000,
                }
            ),
        ),
        case(
            "grammar_left_recursion",
            EITHER,
            response_format={"type": "grammar", "grammar": 'root ::= root "x" | "y"'},
        ),
        # -- request templates
        case(
            "template_nested_loops",
            BAD,
            **template(
                "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"
            ),
        ),
        case("template_string_bomb", BAD, **template("{{ 'x' * 10**10 }}")),
        case(
            "template_output_bomb",
            BAD,
            **template("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}"),
        ),
        case("template_power_tower", EITHER, **template("{{ 10**10**10 }}")),
        case(
            "template_recursive_macro",
            BAD,
            **template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        ),
        case(
            "template_subclasses", BAD, **template("{{ ''.__class__.__mro__[1].__subclasses__() }}")
        ),
        case(
            "template_globals",
            BAD,
            **template("{{ cycler.__init__.__globals__.os.popen('id').read() }}"),
        ),
        case("template_attr_filter", BAD, **template("{{ ''|attr('__class__') }}")),
        case("template_self_context", BAD, **template("{{ self._TemplateReference__context }}")),
        case("template_syntax_error", BAD, **template("{% for %}")),
        case("template_raise", BAD, **template("{{ raise_exception('no') }}")),
        case(
            "template_plain", OK, **template("{% for m in messages %}{{ m.content }}{% endfor %}")
        ),
    ]


async def send(client: httpx.AsyncClient, item: Case) -> tuple[Case, int, float, str]:
    """(case, status, seconds, what went wrong or "")."""
    started = time.monotonic()
    response = await client.post(
        CHAT, content=item.raw, headers={"content-type": "application/json"}
    )
    took = time.monotonic() - started
    problem = ""
    if response.status_code not in item.expect or took > BOUND_S:
        problem = (
            f"{response.status_code} in {took:.1f}s (expected {item.expect}): {response.text[:300]}"
        )
    elif response.status_code == 400:
        error = response.json().get("error")
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            problem = f"400 without OpenAI's error shape: {response.text[:300]}"
    return item, response.status_code, took, problem


@slow
def test_hostile_bodies_get_400_or_are_served_in_time_harming_no_one(truss_server: str) -> None:
    canary = seeded(HELLO, 200)
    alone = httpx.post(f"{truss_server}{CHAT}", json=canary, timeout=120).json()
    canary_text = alone["choices"][0]["message"]["content"]

    cases = hostile_cases()

    async def run():
        limits = httpx.Limits(max_connections=len(cases) + 1)
        async with httpx.AsyncClient(base_url=truss_server, timeout=120, limits=limits) as client:
            watcher = asyncio.create_task(stream_chat(client, canary))
            await asyncio.sleep(0.5)  # the canary is streaming when the hostile bodies land
            results = await asyncio.gather(*(send(client, item) for item in cases))
            return results, await watcher

    results, canary_result = asyncio.run(run())
    wrong = [f"{item.name}: {problem}" for item, _, _, problem in results if problem]
    assert not wrong, "\n".join(wrong)
    assert canary_result.status == 200 and canary_result.done, canary_result
    assert canary_result.text == canary_text, "a hostile request changed another request's output"
    assert wait_until(lambda: engine_idle(truss_server), 15), scrape(truss_server)
    assert httpx.get(f"{truss_server}/v1/models/model", timeout=10).status_code == 200


def server_log(tmp_path_factory: pytest.TempPathFactory, marker: str) -> list[dict]:
    """The JSON records of the session server's log that hold `marker` anywhere."""
    for path in Path(tmp_path_factory.getbasetemp()).glob("truss_server*/server.log"):
        records = []
        for line in path.read_text(errors="replace").splitlines():
            if marker in line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    records.append({"unparsed": line})
        if records:
            return records
    return []


@slow
def test_log_has_one_line_per_request_and_no_prompt_text(
    truss_server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    secret = "SECRET-PROMPT-7f3a"
    served = httpx.post(
        f"{truss_server}{CHAT}",
        json=body(messages=[{"role": "user", "content": f"tell {secret}"}], user="alice"),
        timeout=60,
    )
    assert served.status_code == 200
    request_id = served.json()["id"]
    refused = [
        body(messages=[{"role": "user", "content": secret}], temperature="hot"),
        body(
            messages=[{"role": "user", "content": secret}],
            **template("{{ raise_exception(messages[0].content) }}"),
        ),
        body(messages=[{"role": "robot", "content": secret}]),
    ]
    for item in refused:
        reply = httpx.post(f"{truss_server}{CHAT}", json=item, timeout=60)
        assert reply.status_code == 400
    time.sleep(0.5)  # log lines are flushed per record, but give the server a moment
    assert server_log(tmp_path_factory, secret) == []
    done = server_log(tmp_path_factory, request_id)
    assert len(done) == 1, done
    record = done[0]
    assert record["message"] == "request done"
    assert record["user"] == "alice" and record["finish_reason"] in ("length", "stop")
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] == 4
    assert record["ttft_ms"] is not None and record["total_ms"] >= record["ttft_ms"]


# -- the guards on their own, without a server ------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff{}",
        b'{"a": "\xc0\xaf"}',
        b"[" * 50_000 + b"]" * 50_000,
        b'{"a": NaN}',
        b'{"a": "\\udc00"}',
        b'{"\\ud800": 1}',
        b'{"a": ' + b"7" * 5000 + b"}",
        b"",
    ],
    ids=["utf8", "overlong", "deep", "nan", "surrogate", "surrogate_key", "long_int", "empty"],
)
def test_body_parser_refuses_hostile_bytes(raw: bytes) -> None:
    with pytest.raises(RequestError) as refused:
        parse_json_body(raw, max_bytes=1 << 20)
    assert refused.value.status == 400


def test_body_parser_keeps_escaped_surrogate_pairs_and_limits_size() -> None:
    assert parse_json_body(b'{"a": "\\ud83c\\udf0a"}', max_bytes=100) == {"a": "\U0001f30a"}
    with pytest.raises(RequestError, match="limit is 10"):
        parse_json_body(b'{"a": "0123456789"}', max_bytes=10)


def _spin() -> str:
    while True:
        pass


def _allocate() -> str:
    return "x" * (4 << 30)


def _refuse() -> str:
    raise RequestError("no such variable", param="chat_template_args")


@pytest.mark.parametrize(
    ("render", "message"),
    [
        (_spin, "longer than"),
        (_allocate, "MiB"),
        (lambda: "y" * 101, "more than the 100"),
        (_refuse, "no such variable"),
    ],
    ids=["spins", "allocates", "too_long", "refuses"],
)
def test_template_jail_turns_runaway_renders_into_400s(render: Any, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(RequestError, match=message) as refused:
        render_isolated(render, max_chars=100, timeout_s=1.0)
    assert refused.value.status == 400
    assert time.monotonic() - started < 5


def test_template_jail_returns_the_rendered_text() -> None:
    assert render_isolated(lambda: "rendered", max_chars=100) == "rendered"
