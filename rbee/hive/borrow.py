"""Borrowing another hive's memory: a worker's RPC connections carried to a lender hive.

A worker that holds some of its layers in another hive's memory starts with ``--rpc
127.0.0.1:PORT``, a loopback port where a Tunnel of this hive listens. llama.cpp connects there
a few times in turn (once to ask about the device, then for the model itself); for each
connection the tunnel opens a pipe (PipeOpen, under one lease: the lender hive runs one lender
for the whole loan) on its DEALER to the lender hive's front socket, signed with this hive's
CURVE key, and carries the bytes both ways as PipeData frames. Nothing unauthenticated reaches
an RPC server: the worker talks to this hive's loopback port, the hives talk CURVE, the lender
hive talks to its lender on its own loopback.

It pings the lender hive every PING_EVERY_S (LeasePing; the answer says how much CPU time the
lender has used, which rbee.hive.stall reads with the bytes that came back to tell a lender
that hangs); the lender silent for LENDER_SILENCE_S, a gap in the sequence, a PipeClose or an
Error ends the tunnel, and so does ``fail`` (the hive saw the lender stall): the worker's
connection is closed, llama.cpp aborts the worker, and the hive ends its jobs with LENDER_LOST
and ``reason``. When the worker exits the tunnel ends the lease. Each tunnel is one thread with
its own sockets (the rule of rbee.transport.sockets).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time

import zmq

from rbee import log
from rbee.errors import RbeeError
from rbee.hive.stall import LinkState
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    PIPE_CHUNK_BYTES,
    Error,
    Frame,
    LeasePing,
    LeaseState,
    PipeClose,
    PipeData,
    PipeOpen,
    PipeOpened,
)
from rbee.rpc import read_burst
from rbee.transport.sockets import Curve, curve_client, new_socket

logger = log.get(__name__)

ACCEPT_S = 600.0  # the worker connects as its model starts loading
OPEN_S = 30.0  # the lender hive starts its lender within this
PING_EVERY_S = 1.0
LENDER_SILENCE_S = 3.0  # no frame from the lender for this long: it is gone
IN_FLIGHT_FRAMES = 8  # PipeData frames queued towards the lender (backpressure beyond)
SEND_TIMEOUT_S = 60.0
CLOSE_LINGER_MS = 500


class Tunnel:
    """One RPC connection of one worker to one lender hive."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        lender: str,
        curve: Curve | None,
        lease: str,
        model: str = "",
        lender_name: str = "",
    ) -> None:
        """``lender``: the lender hive's front endpoint (tcp://HOST:PORT); ``curve``: this
        hive's keys and the lender's public key (None only towards a loopback hive); ``lease``:
        the loan's id (its pipes are LEASE.1, LEASE.2 …)."""
        self.ctx = ctx
        self.lender = lender
        self.lender_name = lender_name or lender.removeprefix("tcp://")
        self.curve = curve
        self.lease = lease
        self.model = model
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.reason = ""  # why it ended ("" while it runs)
        self.failed = False  # whether the lender's side ended it (not the worker, not us)
        self.free_bytes = 0  # what the lender had free when it opened
        self.bytes_out = 0
        self.bytes_in = 0
        self.sent_at = self.heard_at = 0.0  # when bytes last went to the lender, came back
        self.lender_cpu_s = 0.0  # the lender's CPU time, as its hive last said
        self.failure = ""  # set by ``fail``: the reason it ends with
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"tunnel-{lease}", daemon=True)

    def start(self) -> Tunnel:
        """Begin waiting for the worker's connection."""
        self.thread.start()
        return self

    def close(self, wait_s: float = 5.0) -> None:
        """End the tunnel (the worker is gone or stopping)."""
        self.stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(wait_s)

    def fail(self, reason: str) -> None:
        """End the tunnel as the lender's failure (its hive saw it stall); ``failed`` and
        ``reason`` say so at once, before the thread has ended."""
        self.failure = reason
        self.reason, self.failed = reason, True
        self.stop.set()

    def state(self) -> LinkState:
        """What the stall watch reads (from the hive's loop; plain values, read whole)."""
        awaited = self.sent_at > self.heard_at
        return LinkState(self.lender_name, self.lender_cpu_s, self.bytes_in, awaited)

    def _run(self) -> None:
        dealer = new_socket(self.ctx, zmq.DEALER)
        conn: socket.socket | None = None
        try:
            dealer.setsockopt(zmq.SNDHWM, IN_FLIGHT_FRAMES)
            dealer.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))
            curve_client(dealer, self.curve, self.lender)
            dealer.connect(self.lender)
            link = _Link(dealer, self.lender_name, self)
            for number in itertools.count(1):
                conn = self._accept(link)
                pipe_id = f"{self.lease}.{number}"
                self._open(link, pipe_id)
                self._relay(conn, link, pipe_id)
                conn.close()
                conn = None
        except _Ended as end:
            self.reason, self.failed = end.reason, end.failed
        except (OSError, zmq.ZMQError, RbeeError) as exc:
            self.reason, self.failed = f"the link to {self.lender_name} failed: {exc}", True
        finally:
            if self.failure:
                self.reason, self.failed = self.failure, True
            if conn is not None:
                conn.close()
            with contextlib.suppress(zmq.ZMQError):
                done = PipeClose(pipe_id=self.lease, reason="borrower done", lease=self.lease)
                dealer.send(encode(done), zmq.NOBLOCK)
            dealer.close(CLOSE_LINGER_MS)  # time for that last frame to leave
            self.listener.close()
            self.reason = self.reason or "closed"
            logger.info(
                "tunnel ended",
                lease=self.lease,
                lender=self.lender_name,
                sent=self.bytes_out,
                received=self.bytes_in,
                reason=self.reason,
            )

    def _accept(self, link: _Link) -> socket.socket:
        """The worker's next connection; the lender is pinged meanwhile."""
        deadline = time.monotonic() + ACCEPT_S
        self.listener.settimeout(PING_EVERY_S / 4)
        while True:
            if self.stop.is_set():
                raise _Ended("closed by this hive", failed=False)
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise _Ended(
                        f"the worker did not connect within {ACCEPT_S:g} s", failed=False
                    ) from None
                if link.opened:
                    link.keep_alive()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(SEND_TIMEOUT_S)
            return conn

    def _open(self, link: _Link, pipe_id: str) -> None:
        link.dealer.send(
            encode(PipeOpen(pipe_id=pipe_id, lease=self.lease, model=self.model), rid=1)
        )
        deadline = time.monotonic() + OPEN_S
        while True:
            if not link.dealer.poll(int(PING_EVERY_S * 1000)):
                if time.monotonic() > deadline:
                    raise _Ended(f"{self.lender_name} did not start a lender within {OPEN_S:g} s")
                link.ping()  # the lender hive hears from us while its lender starts
                continue
            frame = link.read()  # an Error (a refusal) ends the tunnel with its message
            if isinstance(frame, PipeOpened) and frame.pipe_id == pipe_id:
                break
            if isinstance(frame, PipeClose) and frame.pipe_id == pipe_id:
                raise _Ended(f"{self.lender_name} could not lend: {frame.reason}")
        if not link.opened:
            self.free_bytes = frame.free_bytes
            logger.info(
                "borrowing",
                lease=self.lease,
                lender=self.lender_name,
                model=self.model,
                lender_free_mib=self.free_bytes >> 20,
            )
        link.opened = True

    def _relay(self, conn: socket.socket, link: _Link, pipe_id: str) -> None:
        """One connection's bytes both ways, until the worker closes it."""
        poller = zmq.Poller()
        poller.register(conn.fileno(), zmq.POLLIN)
        poller.register(link.dealer, zmq.POLLIN)
        seq_out = seq_in = 0
        while not self.stop.is_set():
            ready = dict(poller.poll(int(PING_EVERY_S * 1000 / 4)))
            if conn.fileno() in ready:
                data = read_burst(conn, PIPE_CHUNK_BYTES)
                if not data:
                    with contextlib.suppress(zmq.Again):
                        closed = PipeClose(pipe_id=pipe_id, reason="the worker closed it")
                        link.dealer.send(encode(closed), zmq.NOBLOCK)
                    return
                link.dealer.send(encode(PipeData(pipe_id=pipe_id, seq=seq_out, data=data)))
                seq_out += 1
                self.bytes_out += len(data)
                self.sent_at = time.monotonic()
            while link.dealer.poll(0):
                frame = link.read()
                if isinstance(frame, PipeData) and frame.pipe_id == pipe_id:
                    if frame.seq != seq_in:
                        raise _Ended(f"bytes from {self.lender_name} were lost on the way")
                    seq_in += 1
                    conn.sendall(frame.data)
                    self.bytes_in += len(frame.data)
                    self.heard_at = time.monotonic()
                elif isinstance(frame, PipeClose) and frame.pipe_id == pipe_id:
                    raise _Ended(f"{self.lender_name} ended the loan: {frame.reason}")
            link.keep_alive(drain=False)
        raise _Ended("closed by this hive", failed=False)


class _Link:
    """The DEALER to the lender hive, and when it was last heard from."""

    def __init__(self, dealer: zmq.Socket[bytes], name: str, tunnel: Tunnel) -> None:
        self.dealer = dealer
        self.name = name
        self.tunnel = tunnel
        self.opened = False
        self.heard = self.pinged = time.monotonic()

    def ping(self) -> None:
        with contextlib.suppress(zmq.Again):
            self.dealer.send(encode(LeasePing(lease=self.tunnel.lease), rid=2), zmq.NOBLOCK)
        self.pinged = time.monotonic()

    def keep_alive(self, drain: bool = True) -> None:
        """Ping when due; raise when the lender hive has been silent too long. ``drain``
        (between pipes, where only pongs and late frames of a closed pipe arrive): read and
        drop what came."""
        while drain and self.dealer.poll(0):
            self.read()
        now = time.monotonic()
        if now - self.heard > LENDER_SILENCE_S:
            raise _Ended(f"{self.name} has been silent for {LENDER_SILENCE_S:g} s")
        if now - self.pinged >= PING_EVERY_S:
            self.ping()

    def read(self) -> Frame:
        """One frame from the lender hive; an Error ends the tunnel."""
        frame = decode(self.dealer.recv()).frame
        self.heard = time.monotonic()
        if isinstance(frame, Error):
            raise _Ended(f"{self.name} failed: {frame.message}")
        if isinstance(frame, LeaseState) and frame.lease == self.tunnel.lease:
            self.tunnel.lender_cpu_s = frame.cpu_s
        if not isinstance(frame, PipeData | PipeClose | LeaseState | PipeOpened):
            raise _Ended(f"{self.name} sent {frame.TYPE} on a pipe")
        return frame


class _Ended(Exception):
    def __init__(self, reason: str, failed: bool = True) -> None:
        super().__init__(reason)
        self.reason, self.failed = reason, failed
