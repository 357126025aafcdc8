"""Unit tests for rbee.worker.engine.StopMatcher (pure: no model is loaded)."""

from __future__ import annotations

import importlib
import random
import sys

import pytest

import rbee.worker
import rbee.worker.engine
from rbee.worker.slots import StopMatcher


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    """Feed chunks until a stop hits; return what each feed released, whether it hit, flush."""
    matcher = StopMatcher(stops)
    released: list[str] = []
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        released.append(out)
        if hit:
            return released, True, matcher.flush()
    return released, False, matcher.flush()


def test_importing_the_engine_does_not_need_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes ``import llama_cpp`` raise ImportError.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    for name in ("engine", "slots"):
        monkeypatch.setattr(rbee.worker, name, getattr(rbee.worker, name))  # restored afterwards
        monkeypatch.delitem(sys.modules, f"rbee.worker.{name}")
    assert importlib.import_module("rbee.worker.engine").BATCH_TOKENS > 0
    fresh = importlib.import_module("rbee.worker.slots")
    assert fresh.StopMatcher(["x"]).feed("axb") == ("a", True)


def test_no_stops_passes_text_through() -> None:
    matcher = StopMatcher([])
    for chunk in ["Hello", ", ", "", "world", "\n\n", "###"]:
        assert matcher.feed(chunk) == (chunk, False)
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.stops == []
    assert matcher.feed("abc") == ("abc", False)
    matcher = StopMatcher(["", "END"])
    assert matcher.stops == ["END"]
    assert matcher.feed("abc") == ("abc", False)  # "" would otherwise match at once
    assert matcher.feed("xEND") == ("x", True)


def test_text_that_cannot_start_a_stop_is_released_at_once() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("Hello world") == ("Hello world", False)
    assert matcher.held == ""


def test_possible_prefix_is_held_then_released_when_it_cannot_match() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("Hello #") == ("Hello ", False)
    assert matcher.held == "#"
    assert matcher.feed("#") == ("", False)
    assert matcher.held == "##"
    assert matcher.feed("x") == ("##x", False)
    assert matcher.held == ""


def test_held_text_keeps_only_the_longest_possible_prefix() -> None:
    matcher = StopMatcher(["abab"])
    assert matcher.feed("xaba") == ("x", False)  # "aba" could still become "abab"
    assert matcher.feed("a") == ("aba", False)  # "abaa": only the last "a" may start it
    assert matcher.held == "a"


def test_stop_split_across_feeds() -> None:
    released, hit, flushed = run(["<|end|>"], ["Hi <", "|e", "n", "d|", ">tail", "more"])
    assert hit is True
    assert released == ["Hi ", "", "", "", ""]
    assert "".join(released) == "Hi "
    assert flushed == ""


def test_text_after_the_stop_in_the_same_feed_is_dropped() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("before STOP after") == ("before ", True)
    assert matcher.flush() == ""


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(["\n"]).feed("\nrest") == ("", True)


def test_earliest_stop_wins() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == ("hel", True)
    matcher = StopMatcher(["lo", "world"])
    assert matcher.feed("hello world") == ("hel", True)
    matcher = StopMatcher(["b", "abc"])
    assert matcher.feed("xabc") == ("x", True)  # "abc" starts before "b"


def test_earliest_stop_wins_when_both_complete_in_one_feed() -> None:
    matcher = StopMatcher(["cd", "bcde"])
    assert matcher.feed("ab") == ("a", False)  # "b" may start "bcde"
    assert matcher.feed("cdef") == ("", True)  # both complete now; "bcde" starts first


def test_flush_releases_held_text() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("end ##") == ("end ", False)
    assert matcher.flush() == "##"
    assert matcher.flush() == ""
    assert matcher.held == ""


def test_unicode_stop_strings() -> None:
    released, hit, _ = run(["✓✓"], ["ünï", "✓", "é", "✓", "✓!"])
    assert hit is True
    assert "".join(released) == "ünï✓é"


# --------------------------------------------------------------------------- properties


def _first_stop_index(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _streaming_reference(chunks: list[str], stops: list[str]) -> str:
    """What a streaming matcher must release: it cannot see the future, so it stops after the
    first feed whose text completes any stop string, cutting at the earliest stop seen so far."""
    text = ""
    for chunk in chunks:
        text += chunk
        cut = _first_stop_index(text, stops)
        if cut is not None:
            return text[:cut]
    return text


def _random_case(rng: random.Random, alphabet: str) -> tuple[str, list[str], list[str]]:
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        for _ in range(rng.randint(0, 3))
    ]
    chunks: list[str] = []
    i = 0
    while i < len(text):
        n = rng.randint(0, 5)  # empty chunks too (a token mid UTF-8 sequence)
        chunks.append(text[i : i + n])
        i += n
    return text, stops, chunks


def _released(stops: list[str], chunks: list[str]) -> str:
    released, _, flushed = run(stops, chunks)
    return "".join(released) + flushed


@pytest.mark.parametrize("alphabet", ["ab", "abc", "ab\n#é"])
def test_property_whole_text_is_truncated_at_first_stop(alphabet: str) -> None:
    rng = random.Random(len(alphabet) * 1000 + 11)
    for _ in range(1500):
        text, stops, _ = _random_case(rng, alphabet)
        cut = _first_stop_index(text, stops)
        expected = text if cut is None else text[:cut]
        assert _released(stops, [text]) == expected, (text, stops)


@pytest.mark.parametrize("alphabet", ["ab", "abc", "ab\n#é"])
def test_property_any_chunking_truncates_at_first_stop(alphabet: str) -> None:
    """With no stop string inside another, the first stop to complete is also the first to
    start, so however the text is chunked the output is the text cut at the first stop."""
    rng = random.Random(len(alphabet) * 1000 + 29)
    checked = hits = 0
    while checked < 1500:
        text, stops, chunks = _random_case(rng, alphabet)
        stops = [s for s in stops if s]
        if any(a != b and a in b for a in stops for b in stops):
            continue
        checked += 1
        cut = _first_stop_index(text, stops)
        hits += cut is not None
        expected = text if cut is None else text[:cut]
        assert _released(stops, chunks) == expected, (text, stops, chunks)
    assert hits > 300  # the generator really exercises stops


@pytest.mark.parametrize("alphabet", ["ab", "abc"])
def test_property_any_stops_any_chunking(alphabet: str) -> None:
    rng = random.Random(len(alphabet) * 1000 + 47)
    for _ in range(2000):
        text, stops, chunks = _random_case(rng, alphabet)
        out = _released(stops, chunks)
        assert out == _streaming_reference(chunks, stops), (text, stops, chunks)
        assert text.startswith(out)
        # released text never contains a whole stop string
        assert all(s not in out for s in stops if s), (text, stops, chunks)
