"""Reaching a hive: an address given by the person, a hive running on this machine, or an
ephemeral hive started for one request and stopped afterwards.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zmq

from rbee.errors import (
    HiveLost,
    HiveUnreachable,
    InvalidRequest,
    RbeeError,
    VersionMismatch,
    error_from_code,
)
from rbee.paths import data_dir, hive_port, self_command
from rbee.process import child_env
from rbee.protocol.messages import PROTOCOL_VERSION, READY_PREFIX, Hello, HelloReply, HiveStatus
from rbee.transport.keys import KnownHives, load_or_create
from rbee.transport.sockets import Curve, DealerClient, is_loopback, tcp_endpoint

HELLO_TIMEOUTS_S = (1.0, 2.0, 3.5)  # bounded retries: all of them fit well within 10 s
RETRY_BACKOFF_S = 0.25
EPHEMERAL_READY_TIMEOUT_S = 30.0
EPHEMERAL_STOP_TIMEOUT_S = 15.0


@dataclass
class HiveLink:
    """An open connection to one hive."""

    ctx: zmq.Context[zmq.Socket[bytes]]
    client: DealerClient
    host: str
    hello: HelloReply
    ephemeral: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    status: HiveStatus | None = None  # what the hive said while the keeper chose it (read once)

    @property
    def curve(self) -> Curve | None:
        """The CURVE settings of this connection (None: a loopback hive in development mode)."""
        return self.client.curve

    @property
    def stream_endpoint(self) -> str:
        """Where this hive publishes token streams."""
        return tcp_endpoint(self.host, self.hello.stream_port)

    def lost(self, exc: HiveUnreachable) -> HiveLost:
        """The error for a hive that stopped answering in the middle of a request."""
        return HiveLost(
            f"hive {self.hello.node} stopped answering: {exc.message}",
            suggestion="check that the hive is still running (`rbee nodes`)",
        )

    def close(self) -> None:
        """Close the connection; an ephemeral hive is stopped and waited for."""
        self.client.close()
        if self.ephemeral is not None:
            stop_ephemeral(self.ephemeral)


def parse_node(node: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[v6]`` or ``[v6]:PORT`` for IPv6) → host and port."""
    usage = "use HOST[:PORT], or [IPV6]:PORT"
    text: str | None = None
    if node.startswith("["):
        host, closed, rest = node[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise InvalidRequest(f"--node {node!r} is not HOST[:PORT]", suggestion=usage)
        text = rest[1:] if rest else None
    elif node.count(":") == 1:
        host, text = node.split(":")
    else:
        host = node  # a name, an IPv4 address or a bare IPv6 address
    if not host:
        raise InvalidRequest(f"--node {node!r} names no host", suggestion=usage)
    return host, _port(text, node) if text is not None else hive_port()


def _port(text: str, node: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise InvalidRequest(f"--node {node!r} has an invalid port", suggestion="use HOST[:PORT]")
    return int(text)


def hello(
    ctx: zmq.Context[zmq.Socket[bytes]],
    host: str,
    port: int,
    timeouts: tuple[float, ...],
    curve: Curve | None = None,
) -> tuple[DealerClient, HelloReply]:
    """Say Hello with bounded retries (a fresh socket each time); HiveUnreachable at the end."""
    endpoint = tcp_endpoint(host, port)
    for attempt, timeout in enumerate(timeouts):
        client = DealerClient(ctx, endpoint, curve)
        try:
            reply = client.request(Hello(client="keeper"), timeout)
        except HiveUnreachable:
            client.close()
            if attempt + 1 < len(timeouts):
                time.sleep(RETRY_BACKOFF_S * (2**attempt))
            continue
        except BaseException:
            client.close()
            raise
        if not isinstance(reply, HelloReply):
            client.close()
            raise HiveUnreachable(f"{endpoint} answered Hello with {reply.TYPE}")
        try:
            check_version(reply)
        except VersionMismatch:
            client.close()
            raise
        return client, reply
    total = sum(timeouts) + sum(RETRY_BACKOFF_S * 2**i for i in range(len(timeouts) - 1))
    hint = f"start one there with `rbee hive`, or check the address and that port {port} is open"
    if curve is None and not is_loopback(host):
        hint += "; a hive on the LAN answers only keepers it has paired with (`rbee pair`)"
    raise HiveUnreachable(
        f"no hive answered at {host}:{port} after {len(timeouts)} tries ({total:.1f} s)",
        suggestion=hint,
    )


def check_version(reply: HelloReply) -> None:
    """VERSION_MISMATCH naming both versions when the hive speaks another protocol."""
    if reply.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"hive {reply.node} speaks protocol {reply.protocol_version}, "
            f"this keeper speaks {PROTOCOL_VERSION}",
            suggestion="install the same rbee version on both machines",
        )


def curve_for(endpoint: str, node_id: str = "", key: str = "", name: str = "") -> Curve | None:
    """CURVE settings to reach a hive: by its announced key (checked against the pinned one)
    or by the key pinned for its address; None when this keeper has not paired with it."""
    known_hives = KnownHives(data_dir())
    if key:
        known = known_hives.check(node_id, key, endpoint, name or endpoint)
    else:
        known = known_hives.find(address=endpoint)
    if known is None:
        return None
    mine = load_or_create(data_dir())
    return Curve(public=mine.public, secret=mine.secret, server=known.key)


def open_link(ctx: zmq.Context[zmq.Socket[bytes]], node: str) -> HiveLink:
    """Connect to the hive at ``node`` (HOST[:PORT]) with bounded retries."""
    host, port = parse_node(node)
    curve = curve_for(tcp_endpoint(host, port).removeprefix("tcp://"))
    client, reply = hello(ctx, host, port, HELLO_TIMEOUTS_S, curve)
    return HiveLink(ctx, client, host, reply)


class EphemeralHive:
    """`rbee hive --ephemeral` on free loopback ports for one request: launched at once, its
    readiness waited for only when the request needs it (so its start-up, and the loading of a
    ``preload`` model, overlap the keeper's LAN survey); ``stop`` if it is not needed after all."""

    def __init__(self, preload: str = "") -> None:
        self.log_path = data_dir() / "ephemeral-hive.log"
        argv = [*self_command(), "hive", "--ephemeral", "--host", "127.0.0.1"]
        argv += ["--port", "0", "--stream-port", "0"]
        if preload:
            argv += ["--preload", preload]
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=child_env(),
            )

    def link(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> HiveLink:
        """Wait for the hive's readiness line and connect; HiveUnreachable with its log's tail
        when it did not start (it is stopped then)."""
        try:
            assert self.proc.stdout is not None
            parts = _read_line(self.proc.stdout, EPHEMERAL_READY_TIMEOUT_S).split()
            if len(parts) != 3 or parts[0] != READY_PREFIX:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                if coded := coded_exit(tail):  # e.g. CATALOG_CORRUPT: the hive's own words
                    raise coded
                raise HiveUnreachable(
                    f"the ephemeral hive did not start (exit code {self.proc.poll()}):\n{tail}",
                    suggestion=f"the full log is {self.log_path}",
                    retryable=False,
                )
            host, port = parse_node(parts[1].removeprefix("tcp://"))
            client, reply = hello(ctx, host, port, HELLO_TIMEOUTS_S)
        except BaseException:
            self.stop()
            raise
        note = (
            f"no hive running here; started an ephemeral one (pid {self.proc.pid}, "
            f"log {self.log_path})"
        )
        return HiveLink(ctx, client, host, reply, self.proc, self.log_path, notes=[note])

    def stop(self) -> None:
        """Stop it and wait (also when it never became ready)."""
        stop_ephemeral(self.proc)


def coded_exit(output: str) -> RbeeError | None:
    """The error an rbee process ended with, rebuilt from the ``error: CODE: message`` and
    ``hint:`` lines its main prints last, or None when it ended otherwise (a crash)."""
    found = None
    for m in re.finditer(r"^error: ([A-Z][A-Z0-9_]*): (.*)\n(?:hint: (.*))?", output, re.M):
        found = m
    if found is None:
        return None
    return error_from_code(
        found.group(1), found.group(2), suggestion=found.group(3) or "", retryable=False
    )


def _read_line(pipe: IO[bytes], timeout_s: float) -> str:
    """One line from a pipe, or "" on EOF or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    buf = b""
    fd = pipe.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1024)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def stop_ephemeral(proc: subprocess.Popen[bytes]) -> None:
    """Close the hive's stdin (its cue to stop its workers and exit); force it if it lingers."""
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(timeout=EPHEMERAL_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
