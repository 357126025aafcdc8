"""A hive of another protocol version: listed, never chosen, and named in VERSION_MISMATCH.

The other hive is a stand-in for a future rbee: a ROUTER that answers every frame in protocol 2
and an mDNS announcement saying so, on loopback in this test's own cluster.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from rbee import discovery
from rbee.errors import ExitCode
from rbee.protocol.messages import PROTOCOL_VERSION
from tests.conftest import free_port
from tests.helpers import run_rbee

FUTURE_PROTOCOL = PROTOCOL_VERSION + 1


@pytest.fixture
def future_hive(rbee_env: dict[str, str]) -> Iterator[int]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if router.poll(50):
                who, data = router.recv_multipart()
                rid = msgpack.unpackb(data).get("r", 0)
                reply = {"v": FUTURE_PROTOCOL, "t": "hello_reply", "r": rid, "b": {}}
                router.send_multipart([who, msgpack.packb(reply)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    announcement = discovery.Announcement(
        node="future",
        node_id="f" * 32,
        address="127.0.0.1",
        port=port,
        stream_port=free_port(),
        rbee_version="9.0.0",
        protocol_version=FUTURE_PROTOCOL,
        cluster=os.environ["RBEE_CLUSTER"],
    )
    announcer = discovery.Announcer(announcement, ["127.0.0.1"])
    try:
        yield port
    finally:
        announcer.close()
        stop.set()
        thread.join(5)
        router.close(0)
        ctx.term()


def test_listed_not_chosen_and_named(future_hive: int, rbee_env: dict[str, str]) -> None:
    listed = json.loads(run_rbee("nodes", "--json", env=rbee_env).stdout)
    assert [n["name"] for n in listed] == ["future"]
    assert listed[0]["protocol_version"] == FUTURE_PROTOCOL
    assert str(listed[0]["state"]).startswith("incompatible"), listed
    ran = run_rbee("infer", "-t", "0", "-n", "4", "Hi", env=rbee_env)
    assert ran.returncode == 0, ran.stderr
    assert "started an ephemeral one" in ran.stderr, "the incompatible hive is never chosen"
    named = run_rbee("infer", "--node", f"127.0.0.1:{future_hive}", "-n", "4", "Hi", env=rbee_env)
    assert named.returncode == ExitCode.FAILURE and "VERSION_MISMATCH" in named.stderr
    assert f"version {FUTURE_PROTOCOL}" in named.stderr, named.stderr
    assert f"speaks {PROTOCOL_VERSION}" in named.stderr, named.stderr
