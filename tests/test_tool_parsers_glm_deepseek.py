"""Tool-call parsers for GLM-4.5 (XML-like argument pairs, typed by the tools' schemas)
and DeepSeek V3 / V3.1 (their own markup tokens), over hand-written model outputs whole
and split into stream chunks as tests/test_tool_parsers.py does for the JSON formats.
"""

from __future__ import annotations

import pytest

from flashserve.api.frontend.tool_parsers import (
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
    Glm45ToolParser,
)
from tests.tool_parser_support import NESTED, SCHEMAS, TOOLS, UNICODE, WEATHER, check, run, splits

# --------------------------------------------------------------------------- GLM-4.5


def glm_call(name: str, *pairs: tuple[str, str]) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in pairs)
    return f"<tool_call>{name}\n{body}</tool_call>"


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("The weather is nice.", "The weather is nice.", []),
        ("a < b, <tool and <tool_call", "a < b, <tool and <tool_call", []),
        (
            glm_call("get_weather", ("city", "Paris"), ("days", "3")),
            "",
            [("get_weather", '{"city": "Paris", "days": 3}')],
        ),
        (
            "Let me check.\n\n" + glm_call("get_weather", ("city", "Paris")),
            "Let me check.",
            [("get_weather", '{"city": "Paris"}')],
        ),
        (
            "Sure.\n"
            + glm_call("get_weather", ("city", "Paris"))
            + "\n"
            + glm_call("add", ("a", "1"), ("b", "2.5"))
            + "\nDone, as asked.",
            "Sure.\nDone, as asked.",
            [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2.5}')],
        ),
        # String keys keep the text as written, JSON-looking or not, escaped for JSON.
        (
            glm_call("get_weather", ("city", "42"), ("days", "three")),
            "",
            [("get_weather", '{"city": "42", "days": "three"}')],
        ),
        (
            glm_call("get_weather", ("city", 'Zürich "☀" <b>\n\ttab \\ end')),
            "",
            [("get_weather", '{"city": "Zürich \\"☀\\" <b>\\n\\ttab \\\\ end"}')],
        ),
        # Keys whose schema rules strings out are read as JSON (through $ref, enums with
        # no string, type lists); untyped and string-or-null keys keep text.
        (
            glm_call(
                "search",
                ("tags", '["news", "web"]'),
                ("exact", "true"),
                ("filter", '{"site": "a.b"}'),
                ("q", "null"),
                ("any", "[1]"),
                ("mode", "2"),
            ),
            "",
            [
                (
                    "search",
                    '{"tags": ["news", "web"], "exact": true, "filter": {"site": "a.b"}, '
                    '"q": "null", "any": "[1]", "mode": 2}',
                )
            ],
        ),
        # GLM-4.7 writes no newlines between the tags; spaces around a JSON value go.
        (
            "<tool_call>add<arg_key>a</arg_key><arg_value> 7 </arg_value></tool_call>",
            "",
            [("add", '{"a": 7}')],
        ),
        # No arguments: "{}".
        ("<tool_call>search\n</tool_call>", "", [("search", "{}")]),
        ("<tool_call>search</tool_call>", "", [("search", "{}")]),
        # An undeclared tool is still a call; with no schema, values are text.
        (glm_call("launch", ("n", "5")), "", [("launch", '{"n": "5"}')]),
        # No end tag (the model stopped after a pair): the call still counts.
        (
            "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n",
            "",
            [("add", '{"a": 1}')],
        ),
    ],
)
def test_glm45_outputs(text: str, content: str, calls: list) -> None:
    check(Glm45ToolParser, text, content, calls)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        # No readable name (Hermes JSON, nothing): the markup is given back as written.
        (
            'Hi <tool_call>{"name": "add"}</tool_call> bye',
            'Hi <tool_call>{"name": "add"}</tool_call> bye',
            [],
        ),
        ("<tool_call></tool_call>", "<tool_call></tool_call>", []),
        # The name was sent: the call stands, broken markup after its pairs is dropped.
        (
            "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\noops</tool_call>"
            " and text",
            "",
            [("add", '{"a": 1}')],
        ),
        ("<tool_call>add\n<arg_key>a<b</arg_key></tool_call>", "", [("add", "{}")]),
        (
            "<tool_call>add\n<arg_key>a</arg_key> x <arg_value>1</arg_value></tool_call>",
            "",
            [("add", '{"a": ')],
        ),
        # A call without a name does not stop the next one from being read.
        (
            "<tool_call>\n</tool_call>\n" + glm_call("add", ("a", "1")),
            "<tool_call>\n</tool_call>",
            [("add", '{"a": 1}')],
        ),
    ],
)
def test_glm45_malformed_outputs(text: str, content: str, calls: list) -> None:
    check(Glm45ToolParser, text, content, calls)


def test_glm45_truncated_call_keeps_what_was_read() -> None:
    text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par"
    check(Glm45ToolParser, text, "", [("get_weather", '{"city": "Par')])
    text = "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b"
    check(Glm45ToolParser, text, "", [("add", '{"a": 1}')])
    check(Glm45ToolParser, "Hm.\n<tool_call>get_wea", "Hm.", [])


def test_glm45_arguments_stream_as_the_pairs_arrive() -> None:
    parser = Glm45ToolParser(TOOLS, None, SCHEMAS)
    pieces = [
        "<tool_call>get_weather\n<arg_key>ci",
        "ty</arg_key>\n<arg_value>Pa",
        "ris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>1",
        "2</arg_value>\n</tool_call>",
    ]
    got = [[d.to_openai()["function"] for d in parser.feed(piece).calls] for piece in pieces]
    assert got == [
        [{"name": "get_weather", "arguments": ""}],
        [{"arguments": '{"city": "Pa'}],
        [{"arguments": 'ris", "days": '}],
        [{"arguments": "12}"}],
    ]


def test_glm45_max_calls() -> None:
    text = glm_call("add", ("a", "1")) + "\n" + glm_call("search") + " and text"
    for chunks in splits(text):
        got = run(Glm45ToolParser, chunks, max_calls=1)
        assert got.calls == [("add", '{"a": 1}')] and got.content == "" and got.exhausted


# --------------------------------------------------------------------------- DeepSeek

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def v31_calls(*calls: tuple[str, str]) -> str:
    body = "".join(f"{CALL_BEGIN}{name}{SEP}{args}{CALL_END}" for name, args in calls)
    return f"{CALLS_BEGIN}{body}{CALLS_END}"


def v3_calls(*calls: tuple[str, str]) -> str:
    body = "\n".join(
        f"{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}" for name, args in calls
    )
    return f"{CALLS_BEGIN}{body}{CALLS_END}"


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Plain <｜answer｜> here.", "Plain <｜answer｜> here.", []),
        (v31_calls(("get_weather", WEATHER)), "", [("get_weather", WEATHER)]),
        (
            "Let me check.\n\n" + v31_calls(("get_weather", WEATHER), ("search", NESTED)),
            "Let me check.",
            [("get_weather", WEATHER), ("search", NESTED)],
        ),
        (v31_calls(("add", f" \n{UNICODE}\n ")), "", [("add", UNICODE)]),
        (v31_calls(("add", "")), "", [("add", "{}")]),
        # A call tag without the section around it.
        (f"{CALL_BEGIN}add{SEP}{{}}{CALL_END}", "", [("add", "{}")]),
        (v31_calls(("add", "{}")) + "\nDone.", "Done.", [("add", "{}")]),
        # Not a call: given back as written.
        (f"{CALLS_BEGIN} hello", f"{CALLS_BEGIN} hello", []),
        (
            v31_calls(("two words", "{}")),
            v31_calls(("two words", "{}")),
            [],
        ),
        # Broken after a call: the call stands, the rest is dropped.
        (
            f"{CALLS_BEGIN}{CALL_BEGIN}add{SEP}{{}}{CALL_END} oops",
            "",
            [("add", "{}")],
        ),
        # Cut short: inside the arguments, they stay as read; before the name, nothing.
        (f'{CALLS_BEGIN}{CALL_BEGIN}add{SEP}{{"a": 1', "", [("add", '{"a": 1')]),
        (f"Hm.{CALLS_BEGIN}{CALL_BEGIN}ad", "Hm.", []),
    ],
)
def test_deepseek_v31_outputs(text: str, content: str, calls: list) -> None:
    check(DeepSeekV31ToolParser, text, content, calls)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (v3_calls(("get_weather", WEATHER)), "", [("get_weather", WEATHER)]),
        (
            "Sure." + v3_calls(("add", '{"a": "`x`"}'), ("search", NESTED)),
            "Sure.",
            [("add", '{"a": "`x`"}'), ("search", NESTED)],
        ),
        # Unfenced arguments are read too.
        (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}add\n{{}}{CALL_END}", "", [("add", "{}")]),
        # Only "function" is a call type.
        (
            f"{CALLS_BEGIN}{CALL_BEGIN}tool{SEP}add\n{{}}{CALL_END}",
            f"{CALLS_BEGIN}{CALL_BEGIN}tool{SEP}add\n{{}}{CALL_END}",
            [],
        ),
    ],
)
def test_deepseek_v3_outputs(text: str, content: str, calls: list) -> None:
    check(DeepSeekV3ToolParser, text, content, calls)


def test_deepseek_max_calls() -> None:
    text = v31_calls(("add", "{}"), ("search", "{}"))
    for chunks in splits(text):
        got = run(DeepSeekV31ToolParser, chunks, max_calls=1)
        assert got.calls == [("add", "{}")] and got.exhausted
