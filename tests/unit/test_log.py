"""Process-wide log fields reach every thread; the ring buffer keeps lines for `rbee logs`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import structlog

from rbee import log
from rbee.keeper.nodes import render_log_line


@pytest.fixture
def configured() -> Iterator[None]:
    saved = dict(log._PROCESS)
    log.configure("hive", json=True, level="info")
    log.bind(node="alpha")
    yield
    log._PROCESS.clear()
    log._PROCESS.update(saved)
    structlog.reset_defaults()


def test_every_thread_carries_the_process_fields(configured: None) -> None:
    logger = log.get("test")
    thread = threading.Thread(target=lambda: logger.info("from a thread", job="j-1"))
    thread.start()
    thread.join()
    lines, _ = log.RECENT.since(0)
    record = json.loads(lines[-1])
    assert record["event"] == "from a thread" and record["job"] == "j-1"
    assert record["component"] == "hive" and record["node"] == "alpha"


def test_rendered_lines_leave_out_what_every_line_repeats(configured: None) -> None:
    log.get("test").info("job started", job="j-2", worker="w-3")
    lines, _ = log.RECENT.since(0)
    text = render_log_line(lines[-1])
    assert text.endswith("w-3 job started job=j-2")
    assert "node=" not in text and "hive" not in text
