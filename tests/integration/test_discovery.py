"""mDNS for real on loopback: what a hive announces is what a keeper's one-shot query finds,
a change is re-announced, and a goodbye takes the hive off at once."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from rbee import discovery
from rbee.protocol.messages import PROTOCOL_VERSION

FOLLOW_S = 0.1


def announcement(backends: str = "cpu", port: int = 40001) -> discovery.Announcement:
    return discovery.Announcement(
        node="disco",
        node_id="d" * 32,
        address="127.0.0.1",
        port=port,
        stream_port=port + 1,
        rbee_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        backends=backends,
        key="k" * 40,
        cluster=os.environ["RBEE_CLUSTER"],
    )


def test_found_updated_and_gone(rbee_env: dict[str, str]) -> None:
    current = [announcement()]
    announcer = discovery.Announcer(current[0], ["127.0.0.1"])
    try:
        started = time.monotonic()
        found = discovery.browse(timeout_s=3)
        took = time.monotonic() - started
        assert found == [current[0]], found  # every TXT field survives the trip
        assert took < discovery.SETTLE_S + 0.5, f"browse returned {took:.2f} s after start"

        announcer.follow(lambda: current[0], FOLLOW_S)
        current[0] = announcement(backends="cpu,cuda:1")
        deadline = time.monotonic() + 10
        while (found := discovery.browse(timeout_s=1)) != [current[0]]:
            assert time.monotonic() < deadline, f"re-announcement never seen: {found}"
    finally:
        announcer.close()
    assert discovery.browse(timeout_s=0.5) == []


def test_browse_waits_for_a_late_hive(rbee_env: dict[str, str]) -> None:
    """Unanswered queries are repeated, so a hive that starts during the wait is found."""
    late: list[discovery.Announcer] = []
    timer = threading.Timer(
        0.6, lambda: late.append(discovery.Announcer(announcement(), ["127.0.0.1"]))
    )
    timer.start()
    try:
        started = time.monotonic()
        found = discovery.browse(timeout_s=5)
        assert [a.node for a in found] == ["disco"]
        assert time.monotonic() - started < 3, "found at a repeated query, not at the deadline"
    finally:
        timer.join()
        for announcer in late:
            announcer.close()


def test_other_clusters_are_not_listed(rbee_env: dict[str, str]) -> None:
    other = discovery.Announcer(
        dataclasses.replace(announcement(), cluster="elsewhere"),
        ["127.0.0.1"],
    )
    try:
        assert discovery.browse(timeout_s=0.6) == []
    finally:
        other.close()
