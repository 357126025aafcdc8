"""Unit tests for rbee.terminal: what reaches a terminal shows escapes instead of obeying them."""

from __future__ import annotations

import pytest

from rbee.cli import report_error
from rbee.errors import WorkerCrashed
from rbee.terminal import CELL_CHARS, cell, safe

HOSTILE = [
    "\x1b]0;pwned\x07",  # OSC: retitles the window
    "\x1b[31mred\x1b[0m",  # CSI colours
    "\x9b2J",  # the 8-bit CSI: clears the screen on some terminals
    "a\rb",  # overwrites what came before
    "\x00\x08\x7f",
    "admin\u202etxt.exe",  # a right-to-left override shows other text than is there
]


@pytest.mark.parametrize("text", HOSTILE)
def test_no_control_character_survives(text: str) -> None:
    shown = safe(text)
    assert all(c.isprintable() for c in shown), repr(shown)
    assert shown.count("\\") >= 1


def test_plain_text_newlines_and_tabs_pass_unchanged() -> None:
    text = "ünïcode 𝄞 line one\n\tline two"
    assert safe(text) == text


def test_a_cell_is_one_line_and_cut_to_fit() -> None:
    assert cell("a\nb\tc") == "a\\nb c"
    long = cell("x" * 10_000)
    assert len(long) == CELL_CHARS and long.endswith("…")


def test_an_error_from_a_hive_cannot_drive_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    code = report_error(WorkerCrashed("died\x1b]0;pwned\x07", suggestion="\x1b[2J"))
    err = capsys.readouterr().err
    assert code == WorkerCrashed.exit_code and "\x1b" not in err
    assert "died\\x1b]0;pwned\\x07" in err and "hint: \\x1b[2J" in err
