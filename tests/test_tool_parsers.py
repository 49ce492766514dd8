"""Tool-call parsers over hand-written model outputs, whole and split into stream chunks.

Every case is parsed whole, character by character, and split in two at every position:
all must give the same content and calls, and every stream must look as an OpenAI client
expects (first delta of a call: index, id, type, name; later deltas: arguments only).
Hermes, Mistral and Llama 3 here, with the JSON scanner they share, parser selection and
any text split anyhow; GLM-4.5 and DeepSeek are tests/test_tool_parsers_glm_deepseek.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flashserve.api.frontend.tool_parsers import (
    DeepSeekV3ToolParser,
    DeepSeekV31ToolParser,
    Glm45ToolParser,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    detect_tool_parser,
    resolve_tool_parser,
)
from flashserve.api.frontend.tool_parsers.json_call import JsonCallScanner
from tests.tool_models import template
from tests.tool_parser_support import NESTED, TOOLS, UNICODE, WEATHER, check, run, splits

# --------------------------------------------------------------------------- Hermes / Qwen


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("The weather is nice.", "The weather is nice.", []),
        ("a < b, <tool and <tool_call", "a < b, <tool and <tool_call", []),
        ("Trailing whitespace stays.\n\n", "Trailing whitespace stays.\n\n", []),
        (hermes_call("get_weather", WEATHER), "", [("get_weather", WEATHER)]),
        (
            "Let me check.\n\n" + hermes_call("get_weather", WEATHER),
            "Let me check.",
            [("get_weather", WEATHER)],
        ),
        (
            hermes_call("get_weather", WEATHER) + "\n" + hermes_call("add", '{"a": 1, "b": 2}'),
            "",
            [("get_weather", WEATHER), ("add", '{"a": 1, "b": 2}')],
        ),
        (
            "Sure.\n" + hermes_call("search", NESTED) + "\nDone, as asked.",
            "Sure.\nDone, as asked.",
            [("search", NESTED)],
        ),
        (hermes_call("get_weather", UNICODE), "", [("get_weather", UNICODE)]),
        # Arguments written as a JSON string of JSON, and under "parameters".
        (
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>',
            "",
            [("add", '{"a": 1}')],
        ),
        (
            '<tool_call>{"name": "add", "parameters": {"a": 1}}</tool_call>',
            "",
            [("add", '{"a": 1}')],
        ),
        # Arguments before the name: held until the name is known.
        (
            '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>',
            "",
            [("add", '{"a": 1}')],
        ),
        # No arguments at all: "{}".
        ('<tool_call>{"name": "search"}</tool_call>', "", [("search", "{}")]),
        # A call to an undeclared tool is still a call (the markup says so).
        (hermes_call("launch", "{}"), "", [("launch", "{}")]),
        # No end tag (the model stopped): the call still counts.
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}', "", [("add", '{"a": 1}')]),
    ],
)
def test_hermes_outputs(text: str, content: str, calls: list) -> None:
    check(HermesToolParser, text, content, calls)


@pytest.mark.parametrize(
    "text, content, calls",
    [
        # Not JSON, or no readable name: the markup is given back as written.
        ("Hi <tool_call>oops</tool_call> bye", "Hi <tool_call>oops</tool_call> bye", []),
        (
            '<tool_call>{name: "add"}</tool_call>',
            '<tool_call>{name: "add"}</tool_call>',
            [],
        ),
        ('<tool_call>{"name": 5}</tool_call>', '<tool_call>{"name": 5}</tool_call>', []),
        # The name was read (and sent): broken arguments stay as the model wrote them.
        (
            '<tool_call>{"name": "add", "arguments": {"a": }}</tool_call>',
            "",
            [("add", '{"a": }')],
        ),
        # A broken call does not stop the next one from being read.
        (
            "<tool_call>{]</tool_call>\n" + hermes_call("add", "{}"),
            "<tool_call>{]</tool_call>",
            [("add", "{}")],
        ),
    ],
)
def test_hermes_malformed_outputs(text: str, content: str, calls: list) -> None:
    check(HermesToolParser, text, content, calls)


def test_hermes_truncated_call_keeps_what_was_read() -> None:
    # max_tokens cut the call short: name and partial arguments were already streamed.
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    check(HermesToolParser, text, "", [("get_weather", '{"city": "Par')])
    # Cut before the name was complete: nothing is a call; the markup stays out of content.
    check(HermesToolParser, 'Hm.\n<tool_call>\n{"name": "get_wea', "Hm.", [])


def test_hermes_max_calls_stops_after_the_first_call() -> None:
    text = hermes_call("add", "{}") + "\n" + hermes_call("search", "{}") + " and text"
    for chunks in splits(text):
        got = run(HermesToolParser, chunks, max_calls=1)
        assert got.calls == [("add", "{}")] and got.content == "" and got.exhausted


def test_arguments_stream_as_they_are_written() -> None:
    parser = HermesToolParser(TOOLS)
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [d.to_openai() for d in first.calls] == [
        {
            "index": 0,
            "id": first.calls[0].id,
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"ci'},
        }
    ]
    second = parser.feed('ty": "Paris"}}\n</tool_call>')
    assert [d.to_openai() for d in second.calls] == [
        {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}
    ]


# --------------------------------------------------------------------------- Mistral


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Plain [answer] here.", "Plain [answer] here.", []),
        (
            f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}]',
            "",
            [("get_weather", WEATHER)],
        ),
        # Several calls; the v3 templates write ids back into the history, ignored here.
        (
            f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}, "id": "abc123DEF"}}, '
            f'{{"name": "search", "arguments": {NESTED}}}]',
            "",
            [("get_weather", WEATHER), ("search", NESTED)],
        ),
        (
            'Let me look.\n[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}]\nDone.',
            "Let me look.\nDone.",
            [("add", '{"a": 1}')],
        ),
        # A bare object without the array.
        ('[TOOL_CALLS] {"name": "add", "arguments": {"a": 1}}', "", [("add", '{"a": 1}')]),
        (f'[TOOL_CALLS] [{{"name": "add", "arguments": {UNICODE}}}]', "", [("add", UNICODE)]),
        # Not a list of calls: given back as written.
        ("[TOOL_CALLS] hello", "[TOOL_CALLS] hello", []),
        ('[TOOL_CALLS] [{"name": 5}]', '[TOOL_CALLS] [{"name": 5}]', []),
        # Broken after a call: the call stands, the rest of the markup is dropped.
        ('[TOOL_CALLS] [{"name": "add", "arguments": {}}} x]', "", [("add", "{}")]),
        # Truncated inside the second call's name: only the first is a call.
        ('[TOOL_CALLS] [{"name": "add", "arguments": {}}, {"name": "se', "", [("add", "{}")]),
    ],
)
def test_mistral_outputs(text: str, content: str, calls: list) -> None:
    check(MistralToolParser, text, content, calls)


def test_mistral_max_calls() -> None:
    text = '[TOOL_CALLS] [{"name": "add", "arguments": {}}, {"name": "search", "arguments": {}}]'
    for chunks in splits(text):
        got = run(MistralToolParser, chunks, max_calls=1)
        assert got.calls == [("add", "{}")] and got.exhausted


# --------------------------------------------------------------------------- Llama 3


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("The answer is 42.", "The answer is 42.", []),
        (
            f'{{"name": "get_weather", "parameters": {WEATHER}}}',
            "",
            [("get_weather", WEATHER)],
        ),
        (
            f'\n\n  {{"name": "get_weather", "parameters": {WEATHER}}}; '
            f'{{"name": "search", "parameters": {NESTED}}}',
            "",
            [("get_weather", WEATHER), ("search", NESTED)],
        ),
        # Newline-separated calls, as some fine-tunes write them.
        (
            '{"name": "add", "parameters": {"a": 1}}\n{"name": "add", "parameters": {"a": 2}}',
            "",
            [("add", '{"a": 1}'), ("add", '{"a": 2}')],
        ),
        # <|python_tag|> opens the calls; the tag never shows.
        (f'<|python_tag|>{{"name": "add", "parameters": {UNICODE}}}', "", [("add", UNICODE)]),
        (
            'I will look it up. <|python_tag|>{"name": "search", "parameters": {"q": "x"}}',
            "I will look it up.",
            [("search", '{"q": "x"}')],
        ),
        # After the tag any name is a call; without it only declared tools are.
        ('<|python_tag|>{"name": "launch", "parameters": {}}', "", [("launch", "{}")]),
        ('{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
        ('{"answer": 42} is the JSON.', '{"answer": 42} is the JSON.', []),
        ('{"name": "add", "parameters": {"a": 1}} Done.', "Done.", [("add", '{"a": 1}')]),
        # A JSON answer later in the text is content: calls only open the answer.
        (
            'Use {"name": "add", "parameters": {}} like this.',
            'Use {"name": "add", "parameters": {}} like this.',
            [],
        ),
        ('{"name": "add", "parameters": {"a": }}', "", [("add", '{"a": }')]),
    ],
)
def test_llama3_outputs(text: str, content: str, calls: list) -> None:
    check(Llama3JsonToolParser, text, content, calls)


def test_llama3_max_calls() -> None:
    text = '{"name": "add", "parameters": {}}; {"name": "search", "parameters": {}}'
    for chunks in splits(text):
        got = run(Llama3JsonToolParser, chunks, max_calls=1)
        assert got.calls == [("add", "{}")] and got.exhausted


# --------------------------------------------------------------------------- shared parts


@pytest.mark.parametrize(
    "text, name, arguments, done",
    [
        ('{"name": "f", "arguments": {"a": [1, {"b": "}"}]}}', "f", '{"a": [1, {"b": "}"}]}', True),
        ('{ "arguments" : { } , "name" : "f" }', "f", "{ }", True),
        ('{"name": "f\\u00e9", "arguments": null}', "fé", "{}", True),
        ('{"name": "f", "arguments": "{\\"x\\": 1}"}', "f", '{"x": 1}', True),
        ('{"name": "f", "extra": [1, "]"], "arguments": {}}', "f", "{}", True),
    ],
)
def test_json_call_scanner(text: str, name: str, arguments: str, done: bool) -> None:
    for step in (1, 3, len(text)):
        scanner = JsonCallScanner()
        used = sum(scanner.feed(text[i : i + step]) for i in range(0, len(text), step))
        assert (scanner.name, scanner.arguments, scanner.done) == (name, arguments, done)
        assert used == len(text)
        json.loads(text)  # the cases are valid JSON: the scanner reads them all


def test_scanner_stops_at_the_end_of_the_object() -> None:
    scanner = JsonCallScanner()
    assert scanner.feed('{"name": "f"} trailing') == len('{"name": "f"}')
    assert scanner.done


@pytest.mark.parametrize("text", ["[1]", '{"name" 1}', '{"name": "f",, }', "{'name': 'f'}"])
def test_scanner_rejects_what_is_not_a_call_object(text: str) -> None:
    scanner = JsonCallScanner()
    scanner.feed(text)
    assert scanner.failed or scanner.name is None


def test_detect_tool_parser_from_chat_templates() -> None:
    assert detect_tool_parser(template("hermes.jinja")) is HermesToolParser
    assert detect_tool_parser(template("llama3.jinja")) is Llama3JsonToolParser
    assert detect_tool_parser(template("mistral.jinja")) is MistralToolParser
    assert detect_tool_parser(template("deepseek_r1.jinja")) is None
    assert detect_tool_parser(template("glm45.jinja")) is Glm45ToolParser
    assert detect_tool_parser(template("deepseek_v31.jinja")) is DeepSeekV31ToolParser
    assert detect_tool_parser(template("deepseek_v3.jinja")) is DeepSeekV3ToolParser
    assert detect_tool_parser(None) is None


def test_resolve_tool_parser_settings() -> None:
    mistral = template("mistral.jinja")
    assert resolve_tool_parser("auto", mistral) is MistralToolParser
    assert resolve_tool_parser("hermes", mistral) is HermesToolParser
    assert resolve_tool_parser("qwen3", None) is HermesToolParser
    assert resolve_tool_parser("llama3_json", None) is Llama3JsonToolParser
    assert resolve_tool_parser("glm45", None) is Glm45ToolParser
    assert resolve_tool_parser("deepseek_v31", None) is DeepSeekV31ToolParser
    assert resolve_tool_parser("deepseek_v3", None) is DeepSeekV3ToolParser
    assert resolve_tool_parser("none", mistral) is None
    with pytest.raises(ValueError, match="unknown tool_call_parser"):
        resolve_tool_parser("pythonic", mistral)


# --------------------------------------------------------------------------- any text

FRAGMENTS = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<tool_", "[TOOL",
    '{"name": "add", "arguments": ', '{"name": "x", "parameters": ', '{"name": ', '"add"',
    "{", "}", "[", "]", ",", ";", ":", '"', "\\", "\n", " ", "text", "é☀", '"a": 1', "null",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "</arg", "add", "```json", "```",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>", "<｜tool", "function",
]  # fmt: skip


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=14),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    parser=st.sampled_from(
        [
            HermesToolParser,
            MistralToolParser,
            Llama3JsonToolParser,
            Glm45ToolParser,
            DeepSeekV31ToolParser,
            DeepSeekV3ToolParser,
        ]
    ),
    max_calls=st.sampled_from([None, 1]),
)
# Whitespace after markup, arriving a character at a time (found by this test once).
@example(
    parts=["<tool_call>", "<|python_tag|>", "\n", "\n", "<tool_call>"],
    cuts=[],
    parser=Llama3JsonToolParser,
    max_calls=None,
)
# A call head broken by markup that itself opens a section (found by this test once).
@example(
    parts=["<｜tool▁call▁begin｜>", "<tool_call>", "<｜tool▁calls▁begin｜>"],
    cuts=[],
    parser=DeepSeekV31ToolParser,
    max_calls=None,
)
def test_any_text_parses_the_same_however_it_is_split(parts, cuts, parser, max_calls) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    whole = run(parser, [text], max_calls)
    for pieces in (chunks, list(text)):
        got = run(parser, pieces, max_calls)
        assert (got.content, got.calls) == (whole.content, whole.calls), pieces
    if max_calls == 1:
        assert len(whole.calls) <= 1
