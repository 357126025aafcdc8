"""Asking every hive in reach how it is: mDNS announcements, seed hosts and this machine's port,
each asked Hello and Status in parallel, all within one deadline.

An announcement or a seed only says where a hive might be: a hive SIGKILLed a moment ago, or
one whose record something still serves, costs the survey at most that deadline, and nothing
when its port refuses the connection (the usual case: its machine is up, its process gone).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import zmq

from rbee import discovery
from rbee.errors import RbeeError
from rbee.keeper.choose import Candidate
from rbee.keeper.link import curve_for, parse_node
from rbee.paths import hive_port
from rbee.protocol.messages import Hello, HelloReply, HiveStatus, Status
from rbee.transport.sockets import Curve, DealerClient, tcp_endpoint

SURVEY_TIMEOUT_S = 1.0  # every hive answers within this of the survey's start, or is skipped
JOIN_GRACE_S = 0.1  # for a thread to close its socket once its deadline has passed
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
    slowest answer, and never longer than SURVEY_TIMEOUT_S, however many hives are silent."""
    deadline = time.monotonic() + SURVEY_TIMEOUT_S
    threads = [
        threading.Thread(target=_ask, args=(ctx, v, keep, deadline), daemon=True) for v in views
    ]
    for t in threads:
        t.start()
    for t, v in zip(threads, views, strict=True):
        t.join(max(0.0, deadline - time.monotonic()) + JOIN_GRACE_S)
        if t.is_alive() and v.hello is None and not v.error:
            v.error, v.error_code = NO_ANSWER, "HIVE_UNREACHABLE"  # a starved thread: late


def local_view(ctx: zmq.Context[zmq.Socket[bytes]]) -> HiveView | None:
    """This machine's hive, if one listens on the hive port (see ``_refuses``); its connection
    is kept open."""
    view = HiveView("127.0.0.1", hive_port(), "local")
    _ask(ctx, view, keep=True)
    return view if view.hello is not None else None


def _refuses(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host`` refuses a TCP connection to ``port``: nothing listens there, so no hive
    runs there now, whatever its announcement says (ZeroMQ would retry in silence until the
    deadline). False when it accepts, or stays silent until ``timeout_s``: the deadline decides
    then. Addresses only: a name's lookup could outlast the deadline, and costs a fresh
    process ~3 ms of codec imports. On loopback a refusal is instant, so a machine without a
    hive pays nothing for asking."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(max(timeout_s, 0.001))
            probe.connect((host, port))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _ask(
    ctx: zmq.Context[zmq.Socket[bytes]],
    view: HiveView,
    keep: bool = False,
    deadline: float | None = None,
) -> None:
    """Ask one hive Hello and Status, both answered by ``deadline`` (default: SURVEY_TIMEOUT_S
    from now); what went wrong lands in the view's error."""
    deadline = deadline if deadline is not None else time.monotonic() + SURVEY_TIMEOUT_S
    if view.source == "local" and _refuses(view.host, view.port, SURVEY_TIMEOUT_S):
        view.error = "nothing listens there"
        return
    a = view.announcement
    try:
        if a is not None and a.key:
            view.curve = curve_for(view.endpoint, a.node_id, a.key, a.node)
            if view.curve is None:
                view.error, view.error_code = f"not paired: `rbee pair {a.node} CODE`", "NOT_PAIRED"
                return
        else:
            view.curve = curve_for(view.endpoint)
        client = DealerClient(ctx, tcp_endpoint(view.host, view.port), view.curve)
    except RbeeError as exc:  # HIVE_KEY_CHANGED; ACCESS_DENIED: no key for an address off loopback
        view.error, view.error_code = exc.message, exc.code
        if a is not None and not a.key and exc.code == "ACCESS_DENIED":
            view.error = (
                "announces no key, so it cannot be a hive on the LAN (those always use CURVE): "
                "never contacted"
            )
        return
    kept = False
    try:
        asked = client.send(Hello(client="keeper")), client.send(Status())  # one round trip
        # While ZeroMQ connects, a plain TCP probe learns at once whether anyone listens.
        if view.source != "local" and _refuses(view.host, view.port, deadline - time.monotonic()):
            view.error = "nothing listens on its port"
            view.error_code = "HIVE_UNREACHABLE"
            return
        hello = next(client.replies(asked[0], max(deadline - time.monotonic(), 0.0)))
        status = next(client.replies(asked[1], max(deadline - time.monotonic(), 0.0)))
        if isinstance(hello, HelloReply) and isinstance(status, HiveStatus):
            view.hello, view.status = hello, status
            if keep:
                view.client, kept = client, True
    except RbeeError as exc:
        view.error, view.error_code = exc.message, exc.code
        if exc.code == "HIVE_UNREACHABLE":
            view.error = NO_ANSWER  # replies() would name the time that was left, not the deadline
    finally:
        if not kept:
            client.close()


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
