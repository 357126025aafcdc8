"""Helpers shared by the integration and e2e tests."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import zmq

from rbee.hive.server import Hive
from rbee.hive.settings import HiveConfig
from rbee.transport.sockets import DealerClient, StreamSubscriber

HIVE_STOP_TIMEOUT_S = 20.0


def rbee_cmd(*args: str) -> list[str]:
    """The argv of the rbee command (run from the test's Python, i.e. the venv)."""
    return [sys.executable, "-m", "rbee", *args]


def run_rbee(
    *args: str, env: dict[str, str], timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `rbee ARGS` to completion and capture its output."""
    return subprocess.run(
        rbee_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, input=stdin
    )


@contextmanager
def hive_in_thread(data_dir: Path, **overrides: object) -> Iterator[Hive]:
    """A real Hive (real sockets, real worker processes) serving from a thread of this test;
    ``overrides`` set HiveConfig fields (``parallel=2``)."""
    config = HiveConfig(host="127.0.0.1", port=0, stream_port=0, data_dir=data_dir, node="test")
    config = dataclasses.replace(config, **overrides)  # type: ignore[arg-type]
    hive = Hive(config)
    thread = threading.Thread(target=hive.serve, name="hive", daemon=True)
    thread.start()
    try:
        yield hive
    finally:
        hive.request_stop()
        thread.join(HIVE_STOP_TIMEOUT_S)
        assert not thread.is_alive(), "the hive did not stop"


@contextmanager
def keeper(hive: Hive, hwm: int = 10_000) -> Iterator[tuple[DealerClient, StreamSubscriber]]:
    """A keeper's two sockets, connected to ``hive``."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = DealerClient(ctx, hive.front_endpoint)
    sub = StreamSubscriber(ctx, hive.stream_endpoint, hwm)
    try:
        yield client, sub
    finally:
        client.close()
        sub.close()
        ctx.term()
