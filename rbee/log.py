"""structlog set-up: readable lines for people, JSON lines for daemons writing to files.

The keeper logs readable lines to stderr. A hive and a worker log JSON lines when stderr is not
a terminal (systemd's journal, a hive reading its worker's pipe) and readable lines otherwise.
"""

from __future__ import annotations

import itertools
import json as jsonlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import MutableMapping
from typing import Any

import structlog

RECENT_LINES = 2000


class Recent:
    """The process's latest log lines (JSON), numbered, for `rbee logs` to fetch from a hive."""

    def __init__(self, size: int = RECENT_LINES) -> None:
        self.lines: deque[tuple[int, str, str]] = deque(maxlen=size)  # (seq, worker, json)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()  # the stderr relay threads log too

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: keep a copy, pass the event on unchanged."""
        line = jsonlib.dumps(event, default=str)
        with self._lock:
            self.lines.append((next(self._seq), str(event.get("worker", "")), line))
        return event

    def since(self, after: int, worker: str = "", limit: int = 500) -> tuple[list[str], int]:
        """Lines numbered after ``after`` (of one worker if given) and the last number seen."""
        with self._lock:
            picked = [
                (n, line) for n, w, line in self.lines if n > after and (not worker or w == worker)
            ]
            last = self.lines[-1][0] if self.lines else after
        picked = picked[-limit:]
        return [line for _, line in picked], max(last, after)


RECENT = Recent()
_PROCESS: dict[str, Any] = {}


def _process_fields(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _PROCESS.items():
        event.setdefault(key, value)
    return event


def bind(**fields: Any) -> None:
    """Fields every later line of this process carries, from every thread (structlog's
    contextvars start empty in each new thread): the component, the node, the worker id."""
    _PROCESS.update(fields)


def configure(component: str, *, json: bool | None = None, level: str | None = None) -> None:
    """Set up structlog for one process; ``json=None`` picks JSON when stderr is no terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    level_name = (level or os.environ.get("RBEE_LOG_LEVEL") or "info").upper()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            RECENT,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    bind(component=component)


def get(name: str) -> Any:
    """A logger named after its module."""
    return structlog.get_logger(name)
