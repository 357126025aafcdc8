"""structlog set-up: readable lines for people, JSON lines for daemons writing to files.

The keeper logs readable lines to stderr. A hive and a worker log JSON lines when stderr is not
a terminal (systemd's journal, a hive reading its worker's pipe) and readable lines otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


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
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)


def get(name: str) -> Any:
    """A logger named after its module."""
    return structlog.get_logger(name)
