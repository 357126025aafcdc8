"""Thin ZeroMQ wrappers: frames in, frames out, deadlines, and rbee errors instead of zmq's.

Nothing here knows about models or workers. Request/reply runs over DEALER → ROUTER with a
request id in every frame; token streams run over PUB/SUB with the job id as topic. Each socket
belongs to the thread that made it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import zmq

from rbee.errors import HiveUnreachable, RbeeError, VersionMismatch, error_from_code
from rbee.protocol.codec import MAX_FRAME_BYTES, Envelope, decode, encode
from rbee.protocol.messages import Error, Frame

LINGER_MS = 0
STREAM_HWM = 10_000
LOCAL_HWM = 0  # unlimited on the worker → hive hop: it must never drop a token


def bind_endpoint(sock: zmq.Socket[bytes], host: str, port: int) -> str:
    """Bind to ``host:port`` (0: a free port) and return the endpoint others connect to."""
    addr = f"tcp://{_bracket(host)}:{port}" if port else f"tcp://{_bracket(host)}:*"
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    sock.bind(addr)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def tcp_endpoint(host: str, port: int) -> str:
    """The endpoint string for a host and port."""
    return f"tcp://{_bracket(host)}:{port}"


def new_socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    """A socket with rbee's defaults: no linger on close, a cap on incoming frame size."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    return sock


def connect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Connect, enabling IPv6 for bracketed addresses."""
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)


@dataclass(frozen=True)
class Incoming:
    """A frame a ROUTER received, with the peer identity to answer."""

    identity: bytes
    envelope: Envelope


class RouterServer:
    """The serving side of request/reply. Malformed frames get an Error reply and are counted."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.dropped = 0

    def recv(self) -> Incoming | None:
        """Read one waiting frame; None if it was malformed (already answered or dropped)."""
        parts = self.sock.recv_multipart(zmq.NOBLOCK)
        if len(parts) != 2:
            self.dropped += 1
            return None
        identity, data = parts
        try:
            return Incoming(identity, decode(data))
        except RbeeError as exc:
            self.dropped += 1
            self.reply_error(identity, 0, exc)
            return None

    def send(self, identity: bytes, frame: Frame, rid: int = 0) -> None:
        """Send a frame to one peer; a peer that vanished is skipped silently (ROUTER rule)."""
        try:
            self.sock.send_multipart([identity, encode(frame, rid)], zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def reply_error(self, identity: bytes, rid: int, exc: RbeeError) -> None:
        """Answer a request with the Error frame for ``exc``."""
        self.send(identity, error_frame(exc), rid)


def error_frame(exc: RbeeError) -> Error:
    """The wire form of an rbee error."""
    return Error(
        code=exc.code,
        message=exc.message[:16_000],
        suggestion=exc.suggestion[:1000],
        retryable=exc.retryable,
        retry_after_s=min(exc.retry_after_s, 3600.0),
    )


def raise_if_error(frame: Frame) -> Frame:
    """Turn an Error reply back into the matching exception; pass other frames through."""
    if isinstance(frame, Error):
        raise error_from_code(
            frame.code,
            frame.message,
            suggestion=frame.suggestion,
            retryable=frame.retryable,
            retry_after_s=frame.retry_after_s,
        )
    return frame


class DealerClient:
    """The asking side of request/reply, with a deadline on every wait."""

    _rids = itertools.count(1)

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.sock = new_socket(ctx, zmq.DEALER)
        connect(self.sock, endpoint)

    def close(self) -> None:
        """Close the socket; pending frames are discarded."""
        self.sock.close(LINGER_MS)

    def send(self, frame: Frame) -> int:
        """Send a request and return its request id."""
        rid = next(self._rids)
        self.sock.send(encode(frame, rid))
        return rid

    def replies(self, rid: int, timeout_s: float) -> Iterator[Frame]:
        """Yield the frames answering ``rid``; each wait is bounded by ``timeout_s``.

        Raises HiveUnreachable when nothing arrives in time; frames for other requests
        (late answers to a request already given up on) are skipped.
        """
        while True:
            deadline = time.monotonic() + timeout_s
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not self.sock.poll(left_ms):
                    raise HiveUnreachable(
                        f"no answer from {self.endpoint} within {timeout_s:.1f} s",
                        suggestion="check that `rbee hive` runs there and the port is reachable",
                    )
                try:
                    env = decode(self.sock.recv())
                except VersionMismatch:
                    raise  # the peer speaks another protocol: say so, don't wait it out
                except RbeeError:
                    continue
                if env.rid == rid:
                    yield raise_if_error(env.frame)
                    break

    def request(self, frame: Frame, timeout_s: float) -> Frame:
        """Send one request and return its single reply (an Error reply is raised)."""
        rid = self.send(frame)
        return next(self.replies(rid, timeout_s))


class StreamSubscriber:
    """The keeper's end of a token stream (SUB)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, hwm: int) -> None:
        self.sock = new_socket(ctx, zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        connect(self.sock, endpoint)

    def subscribe(self, topic: str) -> None:
        """Ask for the frames of one job."""
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())

    def recv(self, timeout_s: float) -> bytes | None:
        """The next frame's payload, or None when nothing arrived within ``timeout_s``."""
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        parts = self.sock.recv_multipart()
        return parts[-1]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(LINGER_MS)
