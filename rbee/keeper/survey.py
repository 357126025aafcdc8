"""Asking every hive in reach how it is: mDNS announcements, seed hosts and this machine's port,
each asked Hello and Status in parallel, all within one deadline.

An announcement or a seed only says where a hive might be: a hive SIGKILLed a moment ago, or
one whose record something still serves, costs the survey at most that deadline, and nothing
when its port refuses the connection (the usual case: its machine is up, its process gone).
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import zmq

from rbee import discovery
from rbee.errors import RbeeError
from rbee.keeper.choose import Candidate
from rbee.keeper.link import curve_for, parse_node
from rbee.paths import hive_port
from rbee.protocol.messages import Frame, Hello, HelloReply, HiveStatus, Status
from rbee.transport.sockets import Curve, DealerClient, raise_if_error, tcp_endpoint

SURVEY_TIMEOUT_S = 1.0  # every hive answers within this of the survey's start, or is skipped
NO_ANSWER = f"no answer within {SURVEY_TIMEOUT_S:.1f} s"


@dataclass
class HiveView:
    """One hive in reach and what it answered (or why it did not)."""

    host: str
    port: int
    source: str  # "mdns" | "seed" | "local"
    announcement: discovery.Announcement | None = None
    hello: HelloReply | None = None
    status: HiveStatus | None = None
    error: str = ""
    error_code: str = ""
    cloned_id: bool = False
    curve: Curve | None = None
    client: DealerClient | None = None  # kept open when asked to: the request can go on it

    def close(self) -> None:
        """Close a kept connection (harmless when there is none)."""
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def name(self) -> str:
        """The node's name (as it answered, else as announced, else its address)."""
        if self.hello is not None:
            return self.hello.node
        if self.announcement is not None:
            return self.announcement.node
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """HOST:PORT."""
        return tcp_endpoint(self.host, self.port).removeprefix("tcp://")

    def candidate(self) -> Candidate:
        """The view the pure choice function works on."""
        proto = self.hello.protocol_version if self.hello else 0
        if self.announcement is not None and self.hello is None:
            proto = self.announcement.protocol_version
        draining = self.hello is not None and self.hello.status == "draining"
        return Candidate(self.name, self.endpoint, proto, self.status, draining)


def survey(
    ctx: zmq.Context[zmq.Socket[bytes]],
    *,
    browse_s: float = discovery.BROWSE_TIMEOUT_S,
    include_local: bool = True,
    keep: bool = False,
    local: HiveView | None = None,
) -> list[HiveView]:
    """Every hive in reach, asked in parallel; unanswered ones carry an error. With ``keep``
    each answering hive's connection stays open (the caller closes the views). ``local`` is
    this machine's hive as just asked (``local_view``): it is not asked again."""
    views: dict[tuple[str, int], HiveView] = {}
    for a in discovery.browse(timeout_s=browse_s) if browse_s > 0 else []:
        views.setdefault((a.address, a.port), HiveView(a.address, a.port, "mdns", a))
    for seed in discovery.seeds():
        host, port = parse_node(seed)
        views.setdefault((host, port), HiveView(host, port, "seed"))
    if include_local:
        here = local or HiveView("127.0.0.1", hive_port(), "local")
        views.setdefault((here.host, here.port), here)
    _ask_all(ctx, [v for v in views.values() if v is not local], keep)
    answered = [v for v in views.values() if v.hello is not None or v.source != "local"]
    unique = _dedupe_and_flag(answered)
    kept = {id(v) for v in unique}
    for v in views.values():
        if id(v) not in kept:
            v.close()
    return sorted(unique, key=lambda v: v.name)


def _ask_all(ctx: zmq.Context[zmq.Socket[bytes]], views: list[HiveView], keep: bool) -> None:
    """Ask every view at once, with one deadline for all: the survey lasts as long as its
    slowest answer, and never longer than SURVEY_TIMEOUT_S, however many hives are silent.
    The caller's thread makes, polls and closes every socket, so a connection that is kept
    belongs to the thread that goes on to use it (the rule of transport/sockets.py)."""
    deadline = time.monotonic() + SURVEY_TIMEOUT_S
    poller = zmq.Poller()
    asks: list[_Ask] = []
    try:
        for view in views:
            asks.append(_Ask(ctx, view, deadline, poller))
        waiting = [a for a in asks if not a.done]
        while waiting and (left_s := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(max(int(left_s * 1000), 1)))
            for ask in waiting:
                ask.step(ready)
            waiting = [a for a in waiting if not a.done]
    finally:
        for ask in asks:
            ask.finish(keep)


def local_view(ctx: zmq.Context[zmq.Socket[bytes]]) -> HiveView | None:
    """This machine's hive, if one listens on the hive port (see ``_Probe``); its connection
    is kept open."""
    view = HiveView("127.0.0.1", hive_port(), "local")
    _ask_all(ctx, [view], keep=True)
    return view if view.hello is not None else None


class _Probe:
    """A plain TCP connection to a hive's port, started without waiting, that tells whether
    the port refuses it: then nothing listens there, so no hive runs there now, whatever its
    announcement says (ZeroMQ would retry in silence until the deadline). A connection that is
    accepted, or still pending at the deadline, refuses nothing: the deadline decides then.
    Addresses only: a name's lookup could outlast the deadline, and costs a fresh process ~3 ms
    of codec imports. On loopback a refusal is instant, so a machine without a hive pays
    nothing for asking."""

    def __init__(self, host: str, port: int) -> None:
        self.sock: socket.socket | None = None  # while the connection is pending
        self.refused = False
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
        except (ValueError, OSError):
            return
        sock.setblocking(False)
        failed = sock.connect_ex((host, port))
        if failed in (errno.EINPROGRESS, errno.EAGAIN):
            self.sock = sock  # writable once it connects or fails
        else:
            sock.close()
            self.refused = failed == errno.ECONNREFUSED

    def settle(self) -> None:
        """Read the outcome once the socket is writable, and close it."""
        if self.sock is not None:
            failed = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.refused = failed == errno.ECONNREFUSED
            self.close()

    def close(self) -> None:
        """Stop waiting (harmless when settled)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _refuses(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host`` refuses a TCP connection to ``port`` within ``timeout_s``."""
    probe = _Probe(host, port)
    if probe.sock is not None and select.select([], [probe.sock], [], max(timeout_s, 0.001))[1]:
        probe.settle()
    probe.close()
    return probe.refused


class _Ask:
    """One hive asked Hello and Status, both answered by the deadline; what went wrong lands in
    the view's error. It sends at once, then reads what the survey's one poll says is ready."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        view: HiveView,
        deadline: float,
        poller: zmq.Poller,
    ) -> None:
        self.view, self.poller = view, poller
        self.client: DealerClient | None = None
        self.probe: _Probe | None = None
        self.asked: tuple[int, int] = (0, 0)  # the request ids of Hello and Status
        self.answers: dict[int, Frame] = {}
        self.done = True
        if view.source == "local" and _refuses(view.host, view.port, deadline - time.monotonic()):
            view.error = "nothing listens there"
            return
        a = view.announcement
        try:
            if a is not None and a.key:
                view.curve = curve_for(view.endpoint, a.node_id, a.key, a.node)
                if view.curve is None:
                    view.error = f"not paired: `rbee pair {a.node} CODE`"
                    view.error_code = "NOT_PAIRED"
                    return
            else:
                view.curve = curve_for(view.endpoint)
            self.client = DealerClient(ctx, tcp_endpoint(view.host, view.port), view.curve)
        except RbeeError as exc:  # HIVE_KEY_CHANGED; ACCESS_DENIED: no key off loopback
            view.error, view.error_code = exc.message, exc.code
            if a is not None and not a.key and exc.code == "ACCESS_DENIED":
                view.error = (
                    "announces no key, so it cannot be a hive on the LAN (those always use "
                    "CURVE): never contacted"
                )
            return
        self.asked = self.client.send(Hello(client="keeper")), self.client.send(Status())
        for sock in self.client.pollables():
            poller.register(sock, zmq.POLLIN)
        if view.source != "local":
            # While ZeroMQ connects, a plain TCP connection learns at once whether anyone listens.
            self.probe = _Probe(view.host, view.port)
            if self.probe.sock is not None:
                poller.register(self.probe.sock.fileno(), zmq.POLLOUT)  # polls return fds
        self.done = False
        if self.probe is not None and self.probe.refused:
            self._end("nothing listens on its port", "HIVE_UNREACHABLE")

    def step(self, ready: dict[Any, int]) -> None:
        """Take what ``ready`` says has come: the probe's outcome, replies, a refusal."""
        assert self.client is not None
        probe = self.probe
        if probe is not None and probe.sock is not None and probe.sock.fileno() in ready:
            self.poller.unregister(probe.sock.fileno())
            probe.settle()
            if probe.refused:
                self._end("nothing listens on its port", "HIVE_UNREACHABLE")
                return
        if not any(sock in ready for sock in self.client.pollables()):
            return
        try:
            while (env := self.client.take()) is not None:
                if env.rid in self.asked:
                    self.answers[env.rid] = raise_if_error(env.frame)
        except RbeeError as exc:
            self._end(exc.message, exc.code)  # an Error reply, another protocol version
            return
        if len(self.answers) == len(self.asked):
            hello, status = (self.answers[rid] for rid in self.asked)
            if isinstance(hello, HelloReply) and isinstance(status, HiveStatus):
                self.view.hello, self.view.status = hello, status
            self._end()

    def _end(self, error: str = "", code: str = "") -> None:
        """Stop waiting on this hive (``error``: why it gave no answer)."""
        if error:
            self.view.error, self.view.error_code = error, code
        if self.probe is not None and self.probe.sock is not None:
            self.poller.unregister(self.probe.sock.fileno())
            self.probe.close()
        if self.client is not None:
            for sock in self.client.pollables():
                self.poller.unregister(sock)
        self.done = True

    def finish(self, keep: bool) -> None:
        """After the deadline: an unanswered hive is late; a connection stays open only for a
        hive that answered, and only when the survey keeps connections."""
        if not self.done:
            self._end(NO_ANSWER, "HIVE_UNREACHABLE")
        if self.client is not None and keep and self.view.hello is not None:
            self.view.client = self.client
        elif self.client is not None:
            self.client.close()


def _dedupe_and_flag(views: list[HiveView]) -> list[HiveView]:
    """One view per running hive (the announced one over the local probe); two hives that
    announce one node id (a cloned machine) are flagged."""
    groups: dict[tuple[str, int], list[HiveView]] = {}
    for v in views:
        key = (v.hello.node, v.hello.pid) if v.hello else (v.host, v.port)
        groups.setdefault(key, []).append(v)
    unique = [min(group, key=lambda v: v.source == "local") for group in groups.values()]
    ids = Counter(v.announcement.node_id for v in unique if v.announcement is not None)
    for v in unique:
        v.cloned_id = v.announcement is not None and ids[v.announcement.node_id] > 1
    return unique
