"""Text from files and the network, made safe to print on a terminal.

A model file's metadata, a hive's name, a remote error message or a log line can hold escape
sequences (an OSC sequence retitles the window, others recolour it or move the cursor) or
bidirectional overrides that show text other than what is there. Everything rbee prints that it
did not write itself goes through ``safe`` (messages, lines) or ``cell`` (table cells), which show
such characters as visible escapes instead of obeying them. Tokens a model generates are the
answer itself and go to stdout untouched, as llama.cpp and Ollama print them.
"""

from __future__ import annotations

import re

CELL_CHARS = 60  # a table cell longer than this is cut with "…": one value never wrecks a table
# C0 controls but tab and newline, DEL, C1 controls (ESC's 8-bit twin CSI is U+009B), and the
# bidirectional embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str) -> str:
    """``text`` with every control character but newline and tab shown as an escape."""
    return _UNSAFE.sub(_escape, text)


def cell(text: str, width: int = CELL_CHARS) -> str:
    """``text`` for one table cell: on one line, escapes shown, at most ``width`` characters."""
    flat = safe(text).replace("\n", "\\n").replace("\t", " ")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
