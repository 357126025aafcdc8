"""Thin ZeroMQ wrappers: frames in, frames out, deadlines, and rbee errors instead of zmq's.

Nothing here knows about models or workers. Request/reply runs over DEALER → ROUTER with a
request id in every frame; token streams run over PUB/SUB with the job id as topic. Each socket
belongs to the thread that made it.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from rbee.errors import (
    AccessDenied,
    CannotListen,
    HiveKeyChanged,
    HiveUnreachable,
    InvalidRequest,
    RbeeError,
    VersionMismatch,
    error_from_code,
)
from rbee.protocol.codec import MAX_REQUEST_BYTES, REPLIES, Bounds, Envelope, decode, encode
from rbee.protocol.messages import Error, Frame, stream_topic

LINGER_MS = 0
AUTH_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
)
FAILED_HANDSHAKES = 2  # a CURVE server that drops us this often does not hold the pinned key
STREAM_HWM = 10_000
LOCAL_HWM = 0  # unlimited on the worker → hive hop: it must never drop a token


def bind_endpoint(sock: zmq.Socket[bytes], host: str, port: int, flag: str = "--port") -> str:
    """Bind to ``host:port`` (0: a free port) and return the endpoint others connect to;
    CannotListen names ``flag`` as the way to choose another port."""
    addr = f"tcp://{_bracket(host)}:{port}" if port else f"tcp://{_bracket(host)}:*"
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(addr)
    except zmq.ZMQError as exc:
        code = exc.errno or 0
        raise cannot_listen(host, port, code, zmq.strerror(code), flag) from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def cannot_listen(host: str, port: int, errno_: int, reason: str, flag: str) -> CannotListen:
    """The error for a bind that failed, with what to do about its usual two causes."""
    if errno_ == errno.EADDRINUSE:
        hint = f"another program holds port {port} (`ss -ltnp 'sport = :{port}'` names it); "
        hint += f"stop it or choose another {flag}"
    elif errno_ < 0 or errno_ in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.EINVAL):  # <0: DNS
        hint = f"this machine has no address {host}: give one of `ip -brief address`, or 0.0.0.0"
    else:
        hint = ""
    return CannotListen(f"cannot listen on {_bracket(host)}:{port}: {reason}", suggestion=hint)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def tcp_endpoint(host: str, port: int) -> str:
    """The endpoint string for a host and port."""
    return f"tcp://{_bracket(host)}:{port}"


def new_socket(
    ctx: zmq.Context[zmq.Socket[bytes]], kind: int, bounds: Bounds = REPLIES
) -> zmq.Socket[bytes]:
    """A socket with rbee's defaults: no linger on close, and incoming frames capped at
    ``bounds.frame_bytes`` (libzmq drops a peer that sends a bigger one before reading it)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, bounds.frame_bytes)
    return sock


def connect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Connect, enabling IPv6 for bracketed addresses."""
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(endpoint)


@dataclass(frozen=True)
class Curve:
    """CURVE settings for a client socket: our key pair and the server's public key."""

    public: str
    secret: str
    server: str


def curve_server(sock: zmq.Socket[bytes], public: str, secret: str) -> None:
    """Make ``sock`` a CURVE server (encrypted; clients are checked by the ZAP handler)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine alone (a name other than localhost
    resolves who knows where: it counts as the network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def endpoint_host(endpoint: str) -> str:
    """``10.0.0.2`` of ``tcp://10.0.0.2:7830`` (``::1`` of ``tcp://[::1]:7830``)."""
    return endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")


def curve_client(
    sock: zmq.Socket[bytes], curve: Curve | None, endpoint: str = "", plaintext_ok: bool = False
) -> None:
    """Make ``sock`` a CURVE client of the server whose key is ``curve.server``.

    Without a key it stays plain, which is allowed only towards loopback (a development-mode
    hive) or with ``plaintext_ok`` (pairing, whose messages SPAKE2 protects): whatever a LAN
    announcement claims, a keeper never sends a request in clear over the network.
    """
    if curve is None:
        if endpoint and not plaintext_ok and not is_loopback(endpoint_host(endpoint)):
            raise AccessDenied(
                f"{endpoint.removeprefix('tcp://')} is not a hive this keeper has paired with, "
                "and a hive off loopback only talks to keepers it has paired with (CURVE): "
                "rbee never sends a request in clear over the network",
                suggestion="pair first: `rbee hive pair` on that hive, then `rbee pair NODE CODE`",
            )
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret.encode())


@dataclass(frozen=True)
class Incoming:
    """A frame a ROUTER received, with the peer identity to answer, on a CURVE socket the
    peer's public key (the ZAP User-Id; "" on a plain socket), and its IP address."""

    identity: bytes
    envelope: Envelope
    user: str = ""
    peer: str = ""


class RouterServer:
    """The serving side of request/reply. Malformed frames get an Error reply and are counted."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        curve: bool = False,
        bounds: Bounds = REPLIES,
        peers: bool = False,
    ) -> None:
        """``bounds``: what one incoming frame may decode to (the socket's own MAXMSGSIZE is
        set by ``new_socket``); ``peers``: whether to read each sender's IP address."""
        self.sock = sock
        self.curve = curve
        self.peers = peers
        self.bounds = bounds
        self.dropped = 0

    def recv(self) -> Incoming | None:
        """Read one waiting frame; None if it was malformed (already answered or dropped)."""
        parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        if len(parts) != 2:
            self.dropped += 1
            return None
        identity, data = parts[0].bytes, parts[1].bytes
        user, peer = (_property(parts[1], "User-Id") if self.curve else ""), ""
        if self.peers:
            peer = _property(parts[1], "Peer-Address")
        try:
            return Incoming(identity, decode(data, self.bounds), user, peer)
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


def _property(frame: zmq.Frame, name: str) -> str:
    """A message property libzmq attached ("" when it has none)."""
    try:
        return str(frame.get(name) or "")
    except zmq.ZMQError:
        return ""


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

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        curve: Curve | None = None,
        plaintext_ok: bool = False,
    ) -> None:
        """``plaintext_ok``: a keyless connection off loopback (pairing only; see curve_client)."""
        self.ctx = ctx
        self.endpoint = endpoint
        self.curve = curve
        self.sock = new_socket(ctx, zmq.DEALER)
        try:
            curve_client(self.sock, curve, endpoint, plaintext_ok)
        except AccessDenied:
            self.sock.close(0)
            raise
        # Watch the handshake: a refused key, or a hive that wants keys, is an error at once.
        self.monitor = self.sock.get_monitor_socket(AUTH_EVENTS)
        self._shaken, self._drops = False, 0
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._poller.register(self.monitor, zmq.POLLIN)
        connect(self.sock, endpoint)

    def close(self) -> None:
        """Close the socket; pending frames are discarded."""
        self.sock.disable_monitor()
        self.monitor.close(LINGER_MS)
        self.sock.close(LINGER_MS)

    def _refused(self) -> RbeeError | None:
        """Why the hive refused our CURVE handshake, if it did."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._shaken = True
            elif event == zmq.EVENT_DISCONNECTED and not self._shaken and self.curve:
                self._drops += 1  # the server could not decrypt our hello: a different key
                if self._drops >= FAILED_HANDSHAKES:
                    return HiveKeyChanged(
                        f"{self.endpoint} cannot complete the CURVE handshake: it does not hold "
                        "the key this keeper pinned for it",
                        suggestion="`rbee keys forget NODE` and pair again if it was reinstalled",
                    )
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return AccessDenied(
                    f"{self.endpoint} refused this keeper's key",
                    suggestion="pair with the hive (`rbee hive pair` there, `rbee pair` here)",
                )
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and self.curve is None:
                return AccessDenied(
                    f"{self.endpoint} only talks to keepers it has paired with",
                    suggestion="pair with the hive (`rbee hive pair` there, `rbee pair` here)",
                )
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                return HiveKeyChanged(
                    f"the CURVE handshake with {self.endpoint} failed: it does not hold the key "
                    "this keeper pinned for it",
                    suggestion="`rbee keys forget NODE` and pair again if it was reinstalled",
                )
        return None

    def send(self, frame: Frame) -> int:
        """Send a request and return its request id; a request bigger than any hive takes is
        refused here, with a reason (the hive would drop the connection without one)."""
        rid = next(self._rids)
        data = encode(frame, rid)
        if len(data) > MAX_REQUEST_BYTES:
            raise InvalidRequest(
                f"the request is {len(data) / 2**20:.1f} MiB; a hive takes at most "
                f"{MAX_REQUEST_BYTES >> 20} MiB",
                suggestion="shorten the prompt or the conversation",
            )
        self.sock.send(data)
        return rid

    def pollables(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        """The request socket and its handshake monitor: what a caller waiting on many clients
        in one poll (the survey) registers for POLLIN, then calls ``take`` when either is ready."""
        return self.sock, self.monitor

    def take(self) -> Envelope | None:
        """The next frame that has arrived, without waiting (None: none yet). A refused
        handshake or a peer of another protocol version raises; a malformed frame is skipped."""
        refused = self._refused()
        if refused is not None:
            raise refused
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                return decode(data)
            except VersionMismatch:
                raise  # the peer speaks another protocol: say so, don't wait it out
            except RbeeError:
                continue

    def replies(self, rid: int, timeout_s: float) -> Iterator[Frame]:
        """Yield the frames answering ``rid``; each wait is bounded by ``timeout_s``.

        Raises HiveUnreachable when nothing arrives in time; frames for other requests
        (late answers to a request already given up on) are skipped.
        """
        while True:
            deadline = time.monotonic() + timeout_s
            while (env := self.take()) is None or env.rid != rid:
                left_s = deadline - time.monotonic()
                if env is None and left_s <= 0:
                    raise HiveUnreachable(
                        f"no answer from {self.endpoint} within {timeout_s:.1f} s",
                        suggestion="check that `rbee hive` runs there and the port is reachable",
                    )
                if env is None:
                    self._poller.poll(max(int(left_s * 1000), 1))
            yield raise_if_error(env.frame)

    def request(self, frame: Frame, timeout_s: float) -> Frame:
        """Send one request and return its single reply (an Error reply is raised)."""
        rid = self.send(frame)
        return next(self.replies(rid, timeout_s))


class StreamSubscriber:
    """The keeper's end of a token stream (SUB)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        hwm: int,
        curve: Curve | None = None,
    ) -> None:
        self.sock = new_socket(ctx, zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        try:
            curve_client(self.sock, curve, endpoint)
        except AccessDenied:
            self.sock.close(0)
            raise
        connect(self.sock, endpoint)

    def subscribe(self, job_id: str) -> None:
        """Ask for the frames of one job (the hive lets only the key that owns it listen)."""
        self.sock.setsockopt(zmq.SUBSCRIBE, stream_topic(job_id))

    def recv(self, timeout_s: float) -> bytes | None:
        """The next frame's payload, or None when nothing arrived within ``timeout_s``."""
        try:
            return self.sock.recv_multipart(zmq.NOBLOCK)[-1]  # a busy stream never polls
        except zmq.Again:
            pass
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv_multipart()[-1]

    def has_pending(self) -> bool:
        """Whether a frame is waiting to be read now (no system call)."""
        events = self.sock.getsockopt(zmq.EVENTS)
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(LINGER_MS)
