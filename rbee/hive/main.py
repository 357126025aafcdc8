"""Entry point of `rbee hive`: bind, announce on the LAN, serve, and stop cleanly on signals.

An ephemeral hive (started by a keeper for one request) binds free loopback ports, writes one
readiness line with its endpoints to stdout, is not announced, and stops when its keeper closes
its stdin or dies.
"""

from __future__ import annotations

import signal
import sys

from rbee import __version__, discovery, gpu, log
from rbee.hive.server import Hive
from rbee.hive.settings import HiveConfig
from rbee.process import die_with_parent
from rbee.protocol.messages import PROTOCOL_VERSION, READY_PREFIX

REANNOUNCE_CHECK_S = 30.0  # how often the hive looks whether its announcement is still true
ANY_HOSTS = ("0.0.0.0", "::", "")

logger = log.get(__name__)


def run(config: HiveConfig) -> int:
    """Run a hive until SIGTERM/SIGINT (or, when ephemeral, until its keeper goes away)."""
    log.configure("hive")
    if config.ephemeral:
        die_with_parent()
    hive = Hive(config)
    if config.preload:
        hive.preload(config.preload)
    signal.signal(signal.SIGTERM, hive.request_stop)
    signal.signal(signal.SIGINT, hive.request_stop)
    announcer = None if config.ephemeral else announce(hive)
    extra_fd = None
    if config.ephemeral:
        print(f"{READY_PREFIX} {hive.front_endpoint} {hive.stream_endpoint}", flush=True)
        extra_fd = sys.stdin.fileno()
    try:
        hive.serve(extra_fd)
    finally:
        if announcer is not None:
            announcer.close()
    return 0


def announce(hive: Hive) -> discovery.Announcer | None:
    """Register the hive with mDNS on the interfaces where it can be reached."""
    host = hive.config.host
    available = discovery.interfaces()
    addresses = available if host in ANY_HOSTS else [a for a in available if a == host]
    if not addresses:
        logger.info("not announced on mDNS", host=host, mdns_interfaces=available)
        return None
    node_id = discovery.node_id(hive.config.data_dir)

    def describe() -> discovery.Announcement:
        return discovery.Announcement(
            node=hive.node,
            node_id=node_id,
            address=addresses[0],
            port=int(hive.front_endpoint.rsplit(":", 1)[1]),
            stream_port=int(hive.stream_endpoint.rsplit(":", 1)[1]),
            rbee_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            backends=gpu.detect().announce_text(),
            key=hive.keys.public if hive.keys is not None else "",
            cluster=discovery.cluster(),
        )

    announcer = discovery.Announcer(describe(), addresses)
    announcer.follow(describe, REANNOUNCE_CHECK_S)
    return announcer
