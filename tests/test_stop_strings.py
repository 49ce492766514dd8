"""StopStringMatcher: stops are found across any delta boundaries and never streamed in part."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashserve.api.frontend.output.stop import StopStringMatcher


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: the stop that occurs first (earliest start, then shortest)."""
    found = [(text.find(s), len(s), s) for s in stops if s and s in text]
    if not found:
        return None
    start, _, stop = min(found)
    return start, stop


def run(deltas: list[str], stops: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Feed deltas until a stop matches (then flush if none did); return emitted pieces."""
    matcher = StopStringMatcher(stops, include)
    pieces: list[str] = []
    for delta in deltas:
        emitted, matched = matcher.feed(delta)
        pieces.append(emitted)
        if matched is not None:
            assert matcher.matched == matched
            return pieces, matched
    pieces.append(matcher.flush())
    return pieces, matcher.matched


def expected_output(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    hit = first_stop(text, stops)
    if hit is None:
        return text, None
    start, stop = hit
    return text[:start] + (stop if include else ""), stop


def splits(text: str, parts: int) -> list[list[str]]:
    """Every way to cut ``text`` into ``parts`` (possibly empty) consecutive deltas."""
    result = []
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), parts - 1):
        bounds = [0, *cuts, len(text)]
        result.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return result


@pytest.mark.parametrize("include", [False, True])
def test_stop_split_across_every_boundary(include: bool) -> None:
    text = "Hello <|end|> world"
    for parts in (1, 2, 3):
        for deltas in splits(text, parts):
            pieces, matched = run(deltas, ["<|end|>"], include)
            assert matched == "<|end|>", deltas
            assert "".join(pieces) == ("Hello <|end|>" if include else "Hello "), deltas


def test_stop_never_streamed_partially() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc S") == ("abc ", None)
    assert matcher.feed("T") == ("", None)
    assert matcher.feed("O") == ("", None)
    assert matcher.feed("x") == ("STOx", None)  # not a stop after all: released at once
    assert matcher.feed("ST") == ("", None)
    assert matcher.feed("OP and more") == ("", "STOP")
    assert matcher.feed("ignored") == ("", None)
    assert matcher.flush() == ""
    assert matcher.finished


def test_one_character_per_delta() -> None:
    text = "The answer is 42.\nObservation: done"
    pieces, matched = run(list(text), ["\nObservation:", "Final Answer:"])
    assert matched == "\nObservation:"
    assert "".join(pieces) == "The answer is 42."


def test_several_stops_earliest_wins() -> None:
    assert run(["Hello world"], ["world", "Hello"]) == ([""], "Hello")
    assert run(["a b c"], ["c", "b"]) == (["a "], "b")
    assert run(["xx", "y", "zz"], ["zz", "yz"]) == (["xx", "", ""], "yz")


def test_overlapping_prefixes() -> None:
    # Same start: the shorter stop completes first and wins without waiting.
    assert run(["xxab", "c"], ["abc", "ab"]) == (["xx"], "ab")
    assert run(["xxab", "c"], ["abc", "ab"], include=True) == (["xxab"], "ab")
    # "bc" completes inside "abc", but "abcd" would start earlier: wait for one more char.
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("abc") == ("", None)
    assert matcher.feed("d") == ("", "abcd")
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("abc") == ("", None)
    assert matcher.feed("x") == ("a", "bc")
    # Generation ended while waiting: the completed stop stands.
    matcher = StopStringMatcher(["abcd", "bc"], include_stop_str_in_output=True)
    assert matcher.feed("zabc") == ("z", None)
    assert matcher.flush() == "abc"
    assert matcher.matched == "bc"


def test_repeated_characters_in_stop() -> None:
    assert run(["aaaa", "ab"], ["aaab"]) == (["a", "a"], "aaab")
    assert run(list("abababx"), ["ababx"]) == (["", "", "", "", "ab", "", ""], "ababx")


def test_no_hold_back_without_a_possible_stop() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("plain text") == ("plain text", None)
    assert matcher.feed(" and <") == (" and ", None)
    assert matcher.feed("/ans") == ("", None)
    assert matcher.flush() == "</ans"
    assert matcher.matched is None


def test_flush_releases_everything_held() -> None:
    pieces, matched = run(["Hello wor"], ["world"])
    assert pieces == ["Hello ", "wor"]
    assert matched is None


def test_stop_at_the_very_start_and_end() -> None:
    assert run(["STOP", "after"], ["STOP"]) == ([""], "STOP")
    assert run(["before", "STOP"], ["STOP"], include=True) == (["before", "STOP"], "STOP")


def test_no_stops_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""
    assert run(["a", "b"], [""]) == (["a", "b", ""], None)  # empty stops are ignored


def test_unicode_stops() -> None:
    text = "答案是四十二。🛑 后面的内容"
    for deltas in splits(text, 2):
        pieces, matched = run(deltas, ["🛑", "。🛑"])
        assert (matched, "".join(pieces)) == ("。🛑", "答案是四十二")


def test_held_text_is_bounded_with_many_long_stops() -> None:
    rng = random.Random(0)
    stops = ["".join(rng.choice("ab") for _ in range(1000)) for _ in range(32)]
    longest = max(map(len, stops))
    matcher = StopStringMatcher(stops)
    fed = emitted = 0
    for _ in range(50_000):
        delta = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        out, matched = matcher.feed(delta)
        assert matched is None
        fed += len(delta)
        emitted += len(out)
        assert fed - emitted < longest


def test_stop_found_after_long_near_misses() -> None:
    stop = "x" * 999 + "y"
    text = "x" * 5000 + "y tail"
    pieces, matched = run([text[i : i + 7] for i in range(0, len(text), 7)], [stop])
    assert matched == stop
    assert "".join(pieces) == "x" * 4001


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
    include=st.booleans(),
)
def test_property_output_is_text_up_to_first_stop(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    pieces, matched = run(deltas, stops, include)
    assert ("".join(pieces), matched) == expected_output(text, stops, include)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_property_with_stops_taken_from_the_text(data: st.DataObject) -> None:
    text = data.draw(st.text(max_size=60), label="text")
    stops = data.draw(st.lists(st.text(min_size=1, max_size=4), max_size=3), label="stops")
    for _ in range(data.draw(st.integers(0, 3), label="substrings")):
        a = data.draw(st.integers(0, len(text)))
        b = data.draw(st.integers(a, min(len(text), a + 8)))
        stops.append(text[a:b])
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12), label="cuts")
    include = data.draw(st.booleans(), label="include")
    bounds = sorted({0, len(text), *cuts})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    pieces, matched = run(deltas, stops, include)
    assert ("".join(pieces), matched) == expected_output(text, stops, include)


@pytest.mark.parametrize("gathered", [2, 3, 5])
def test_min_tokens_holds_stop_strings_however_outputs_were_gathered(gathered: int) -> None:
    """Stop strings count from the min_tokens-th token on, also when outputs arrive several
    tokens at a time (stream_interval, a consumer that fell behind)."""
    from transformers import AutoTokenizer

    from flashserve.api.frontend.options import GenerationOptions
    from flashserve.api.frontend.output.output_plan import ParsingPlan
    from flashserve.api.frontend.output.text_output import TextOutput
    from flashserve.api.frontend.output.token_text import TokenText
    from flashserve.engine.sequence import SequenceOutput
    from tests.chat_harness import EMBEDDED_MODEL

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL))
    hello = tokenizer.convert_tokens_to_ids("▁Hello")
    options = GenerationOptions(stop="Hello", min_tokens=3)

    def run(size: int) -> tuple[str, str | None, int]:
        output = TextOutput(tokenizer, TokenText(tokenizer), options, [], ParsingPlan())
        text = ""
        ids = [hello] * 6
        for start in range(0, len(ids), size):
            last = start + size >= len(ids)
            piece = output.step(
                SequenceOutput("r", ids[start : start + size], last, "length" if last else None)
            )
            text += piece.text
            if piece.finish_reason is not None:
                break
        return text, piece.stop_reason, piece.completion_tokens

    one_by_one = run(1)
    assert one_by_one[0].strip() == "Hello Hello" and one_by_one[1] == "Hello"
    assert run(gathered)[:2] == one_by_one[:2]
