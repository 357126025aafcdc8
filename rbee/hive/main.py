"""Entry point of `rbee hive`: bind, announce readiness, serve, and stop cleanly on signals.

An ephemeral hive (started by a keeper for one request) binds free loopback ports, writes one
readiness line with its endpoints to stdout, and stops when its keeper closes its stdin or dies.
"""

from __future__ import annotations

import signal
import sys

from rbee import log
from rbee.hive.server import Hive, HiveConfig
from rbee.process import die_with_parent

READY_PREFIX = "RBEE_HIVE_READY"


def run(config: HiveConfig) -> int:
    """Run a hive until SIGTERM/SIGINT (or, when ephemeral, until its keeper goes away)."""
    log.configure("hive")
    if config.ephemeral:
        die_with_parent()
    hive = Hive(config)
    signal.signal(signal.SIGTERM, hive.request_stop)
    signal.signal(signal.SIGINT, hive.request_stop)
    extra_fd = None
    if config.ephemeral:
        print(f"{READY_PREFIX} {hive.front_endpoint} {hive.stream_endpoint}", flush=True)
        extra_fd = sys.stdin.fileno()
    hive.serve(extra_fd)
    return 0
