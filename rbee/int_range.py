"""Grammar rules for the integers between two bounds, for JSON schemas' ``minimum`` and
``maximum``: llama.cpp's C++ schema converter has them, its Python port (the one a keeper can
run without a model) ignores them, and an output that breaks the schema is not an answer.

The range is split, per number of digits, into runs of fixed digits followed by one digit
class and free digits (the usual numeric-range-to-pattern split): [7, 234] is 7-9, 1-9 0-9,
1 0-9 0-9, 2 0-2 0-9, 2 3 0-4. Each run is a list of character classes, rendered as GBNF here
and as a regular expression by the tests that check every number of a window.
"""

from __future__ import annotations

Run = tuple[list[str], bool]  # the classes ("5", "0-9"), and whether any further digits follow
OPEN_DIGITS = 15  # an unbounded side: at most this many more digits, as llama.cpp's integers


def alternatives(lo: int | None, hi: int | None) -> list[Run]:
    """The runs whose union is the decimal integers n with lo ≤ n ≤ hi (None: unbounded), each
    written without leading zeros and with ``-`` for negatives (never ``-0``)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"no integer lies between {lo} and {hi}")
    runs: list[Run] = []
    if lo is None or lo < 0:  # -k for k from max(1, -hi) up to -lo
        k_min = 1 if hi is None or hi >= 0 else -hi
        runs += [(["-", *classes], more) for classes, more in _natural(k_min, _neg(lo))]
    if hi is None or hi >= 0:
        runs += _natural(max(lo or 0, 0), hi)
    return runs


def _neg(n: int | None) -> int | None:
    return None if n is None else -n


def _natural(lo: int, hi: int | None) -> list[Run]:
    """lo ≤ n ≤ hi for 0 ≤ lo, by number of digits."""
    runs: list[Run] = []
    low = len(str(lo))
    for digits in range(low, (low if hi is None else len(str(hi))) + 1):
        start = str(lo) if digits == low else "1" + "0" * (digits - 1)
        end = str(hi) if hi is not None and digits == len(str(hi)) else "9" * digits
        runs += [(classes, False) for classes in _same_length(start, end)]
    if hi is None:  # any number with more digits than lo
        runs.append((["1-9"] + ["0-9"] * low, True))
    return runs


def _same_length(lo: str, hi: str) -> list[list[str]]:
    """The digit strings of lo's length between lo and hi (lo ≤ hi, as many digits)."""
    if not lo:
        return [[]]
    if lo[0] == hi[0]:
        return [[lo[0], *rest] for rest in _same_length(lo[1:], hi[1:])]
    n = len(lo) - 1
    first, last = lo[0], hi[0]
    runs: list[list[str]] = []
    if lo[1:] != "0" * n:  # lo's first digit with the rest from lo's rest up
        runs += [[lo[0], *rest] for rest in _same_length(lo[1:], "9" * n)]
        first = chr(ord(first) + 1)
    tail: list[list[str]] = []
    if hi[1:] != "9" * n:  # hi's first digit with the rest up to hi's rest
        tail = [[hi[0], *rest] for rest in _same_length("0" * n, hi[1:])]
        last = chr(ord(last) - 1)
    if first <= last:  # every first digit in between, any rest
        runs.append([first if first == last else f"{first}-{last}"] + ["0-9"] * n)
    return runs + tail


def gbnf(lo: int | None, hi: int | None) -> str:
    """A GBNF expression for the integers from lo to hi."""

    def one(classes: list[str], more: bool) -> str:
        parts = [f'"{c}"' if len(c) == 1 else f"[{c}]" for c in classes]
        return " ".join(parts + ([f"[0-9]{{0,{OPEN_DIGITS}}}"] if more else []))

    return "(" + " | ".join(one(*run) for run in alternatives(lo, hi)) + ")"
