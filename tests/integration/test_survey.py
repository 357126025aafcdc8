"""The survey on loopback: a refusing port costs nothing, a silent one the shared deadline, and an
answering hive's connection is made, asked and kept by the caller's thread, which goes on to use
it (a ZeroMQ socket belongs to the thread that made it)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq

from rbee.keeper.survey import NO_ANSWER, SURVEY_TIMEOUT_S, survey
from rbee.protocol.codec import REQUESTS
from rbee.protocol.messages import PROTOCOL_VERSION, Hello, HelloReply, HiveStatus, Status
from rbee.transport.sockets import RouterServer, bind_endpoint, new_socket
from tests.conftest import free_port

SLACK_S = 0.5


@contextmanager
def silent_port() -> Iterator[int]:
    """A port whose TCP connections are accepted (by the kernel's backlog) and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@contextmanager
def fake_hive(ctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[int]:
    """A ROUTER answering Hello and Status as a hive would, on a thread that owns it."""
    bound = threading.Event()
    stop = threading.Event()
    port: list[int] = []

    def serve() -> None:
        sock = new_socket(ctx, zmq.ROUTER, REQUESTS)
        try:
            port.append(int(bind_endpoint(sock, "127.0.0.1", 0).rsplit(":", 1)[1]))
            bound.set()
            server = RouterServer(sock, bounds=REQUESTS)
            while not stop.is_set():
                if not sock.poll(50):
                    continue
                incoming = server.recv()
                if incoming is None:
                    continue
                frame = incoming.envelope.frame
                reply: HelloReply | HiveStatus
                if isinstance(frame, Hello):
                    reply = HelloReply(
                        node="fake",
                        rbee_version="0.1.0",
                        protocol_version=PROTOCOL_VERSION,
                        pid=os.getpid(),
                        stream_port=1,
                        status="ok",
                    )
                else:
                    assert isinstance(frame, Status)
                    reply = HiveStatus(
                        node="fake",
                        rbee_version="0.1.0",
                        protocol_version=PROTOCOL_VERSION,
                        workers=[],
                        models=[],
                        cpu_count=1,
                        ram_total_bytes=1,
                        ram_free_bytes=1,
                        disk_free_bytes=1,
                        queue_length=0,
                        max_workers=1,
                    )
                server.send(incoming.identity, reply, incoming.envelope.rid)
        finally:
            sock.close(0)

    thread = threading.Thread(target=serve, name="fake-hive")
    thread.start()
    try:
        assert bound.wait(5)
        yield port[0]
    finally:
        stop.set()
        thread.join(5)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def test_a_refusing_seed_costs_nothing_and_a_silent_one_the_deadline(
    rbee_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    refusing = free_port()
    monkeypatch.setenv("RBEE_SEEDS", f"127.0.0.1:{refusing}")
    started = time.monotonic()
    (view,) = survey(ctx, browse_s=0, include_local=False)
    assert time.monotonic() - started < SLACK_S
    assert (view.error, view.error_code) == ("nothing listens on its port", "HIVE_UNREACHABLE")
    assert view.hello is None and view.client is None

    with silent_port() as silent:
        monkeypatch.setenv("RBEE_SEEDS", f"127.0.0.1:{refusing},127.0.0.1:{silent}")
        started = time.monotonic()
        views = {v.port: v for v in survey(ctx, browse_s=0, include_local=False, keep=True)}
        took = time.monotonic() - started
    assert SURVEY_TIMEOUT_S - 0.05 <= took < SURVEY_TIMEOUT_S + SLACK_S
    assert views[refusing].error == "nothing listens on its port"
    assert (views[silent].error, views[silent].error_code) == (NO_ANSWER, "HIVE_UNREACHABLE")
    assert views[silent].client is None  # an unanswered connection is never kept


def test_an_answering_hive_is_kept_for_the_thread_that_surveyed(
    rbee_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with fake_hive(ctx) as port:
        monkeypatch.setenv("RBEE_SEEDS", f"127.0.0.1:{port}")
        before = set(threading.enumerate())
        started = time.monotonic()
        (view,) = survey(ctx, browse_s=0, include_local=False, keep=True)
        assert time.monotonic() - started < SLACK_S  # as soon as both answers are in
        assert set(threading.enumerate()) == before  # asked from this thread alone
        try:
            assert view.error == "" and view.hello is not None and view.status is not None
            assert view.hello.node == "fake" and view.name == "fake"
            assert view.client is not None
            again = view.client.request(Hello(client="keeper"), 5.0)  # this thread's socket
            assert isinstance(again, HelloReply)
        finally:
            view.close()
