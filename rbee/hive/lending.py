"""Lending this hive's memory to a model that another hive holds.

A peer hive whose key has the ``hive`` or ``admin`` role sends PipeOpen on the front socket. The
first pipe of a lease (one borrowing worker) starts a lender (`rbee lender`: llama.cpp's RPC
server on a loopback port); every pipe of the lease (llama.cpp opens a few connections in turn:
one to ask about the device, then the one that carries the model) is connected to it, and the
RPC byte stream relayed: PipeData frames from the peer go to the lender's socket, what the lender
writes goes back as PipeData frames on the same connection. Nothing but this hive reaches the
lender's port; every byte from the LAN came through CURVE from an authorized key.

The relay runs on the hive's loop and never blocks it: a lender's socket is non-blocking, what it
cannot take yet waits in the pipe's buffer (bounded), and the loop polls the socket. A pipe ends
when either side closes it, when a sequence number is missing (a frame dropped at a high-water
mark), or when its lender's connection fails; a lease ends when the borrower says so, when its
lender exits, or when the borrower has been silent for PIPE_SILENCE_S (its tunnel pings every
second): the lender is killed and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import zmq

from rbee import log
from rbee.errors import LendingRefused
from rbee.gpu import cpu_info, process_cpu_seconds
from rbee.hive.lendable import Lendable, lender_command
from rbee.hive.request import Replies, Request
from rbee.process import child_env
from rbee.protocol.codec import encode
from rbee.protocol.messages import (
    PIPE_CHUNK_BYTES,
    LeasePing,
    LeaseState,
    PipeClose,
    PipeData,
    PipeOpen,
    PipeOpened,
)
from rbee.rpc import read_burst

logger = log.get(__name__)

LENDER_START_S = 30.0  # a lender that does not listen by then is given up
PIPE_SILENCE_S = 5.0  # a borrower pings every second; this much silence means it is gone
MAX_BUFFERED_BYTES = 256 << 20  # what the lender may owe the socket before the pipe is ended
MAX_LEASES = 8
STDERR_LINES = 20


@dataclass(eq=False)
class Lease:
    """One borrowing worker's loan: the lender process that holds its layers."""

    lease_id: str
    who: bytes  # the peer's ROUTER identity
    key: str
    model: str
    endpoint: str
    proc: subprocess.Popen[bytes]
    lent: Lendable
    seen: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_LINES))


@dataclass(eq=False)
class Pipe:
    """One RPC connection of a lease, and the socket to its lender."""

    pipe_id: str
    lease: Lease
    rid: int  # PipeOpen's request id: PipeOpened answers it
    sock: socket.socket | None = None
    out: deque[memoryview] = field(default_factory=deque)
    out_bytes: int = 0
    seq_in: int = 0
    seq_out: int = 0


class LendingDesk:
    """The leases and pipes this hive lends through, on the hive's loop (``poller``: the
    loop's)."""

    def __init__(
        self,
        replies: Replies,
        poller: zmq.Poller,
        cache_dir: Path,
        threads: int,
        engine_env: dict[str, str],
        enabled: bool = True,
        draining: Callable[[], bool] = lambda: False,
        lendable: Callable[[], Lendable] | None = None,
    ) -> None:
        """``lendable``: the device a new lender lends (rbee.hive.lendable; the RAM when
        None)."""
        self.replies = replies
        self.lendable = lendable or (lambda: Lendable("cpu", cpu_info().ram_free_bytes))
        self.draining = draining
        self.poller = poller
        self.cache_dir = cache_dir
        self.threads = threads
        self.engine_env = engine_env
        self.enabled = enabled
        self.leases: dict[str, Lease] = {}
        self.pipes: dict[str, Pipe] = {}
        self.by_fd: dict[int, Pipe] = {}

    # ------------------------------------------------------------------ requests

    def on_open(self, request: Request, frame: PipeOpen) -> None:
        """Connect a pipe to its lease's lender (started now for a new lease); PipeOpened
        follows once the lender listens."""
        if request.role not in ("hive", "admin"):
            raise LendingRefused(
                "lending memory needs a key with the hive or admin role",
                suggestion="on the lending hive: `rbee hive authorize KEY --role hive`",
            )
        if not self.enabled:
            raise LendingRefused(
                "this hive does not lend its memory (lend = false)",
                suggestion="`rbee hive --lend` or `[hive] lend = true` turns it on",
            )
        if self.draining():
            raise LendingRefused("this hive is shutting down", retryable=True)
        lease = self.leases.get(frame.lease)
        if lease is not None and lease.who != request.who:
            raise LendingRefused(f"lease {frame.lease} belongs to another connection")
        if frame.pipe_id in self.pipes:
            raise LendingRefused(f"pipe {frame.pipe_id} is open already")
        if lease is None:
            if len(self.leases) >= MAX_LEASES:
                raise LendingRefused(f"this hive lends to {MAX_LEASES} workers already")
            lease = self._start(request, frame)
        self.pipes[frame.pipe_id] = Pipe(frame.pipe_id, lease, request.rid)

    def on_data(self, request: Request, frame: PipeData) -> None:
        """Bytes for a lender: queued for its socket in order."""
        pipe = self.pipes.get(frame.pipe_id)
        if pipe is None or pipe.lease.who != request.who:
            return
        if frame.seq != pipe.seq_in:
            self.close(pipe, f"bytes were lost on the way (frame {frame.seq}, not {pipe.seq_in})")
            return
        pipe.seq_in += 1
        if frame.data:
            pipe.out.append(memoryview(frame.data))
            pipe.out_bytes += len(frame.data)
            self._flush(pipe)

    def on_close(self, request: Request, frame: PipeClose) -> None:
        """The borrower is done with a pipe, or (``lease``) with the whole loan."""
        pipe = self.pipes.get(frame.pipe_id)
        if pipe is not None and pipe.lease.who == request.who:
            self.close(pipe, frame.reason or "the borrower closed it", tell=False)
        lease = self.leases.get(frame.lease)
        if lease is not None and lease.who == request.who:
            self.end(lease, frame.reason or "the borrower is done", tell=False)

    def on_ping(self, request: Request, frame: LeasePing) -> None:
        """The borrower's keep-alive: answered with the CPU time its lender has used, which
        tells the borrower (rbee.hive.stall) a lender that hangs from one that computes."""
        if request.role not in ("hive", "admin"):
            raise LendingRefused("lending memory needs a key with the hive or admin role")
        lease = self.leases.get(frame.lease)
        mine = lease is not None and lease.who == request.who
        cpu_s = process_cpu_seconds(lease.proc.pid) if lease is not None and mine else None
        if cpu_s is None:  # no such lease (not yet, or no more), or its lender is gone
            self.replies.send(request, LeaseState(lease=frame.lease))
        else:
            self.replies.send(request, LeaseState(lease=frame.lease, cpu_s=cpu_s, running=True))

    def seen(self, who: bytes) -> None:
        """Any frame from a peer shows it is alive."""
        now = time.monotonic()
        for lease in self.leases.values():
            if lease.who == who:
                lease.seen = now

    # ------------------------------------------------------------------ the loop

    def owns(self, fd: int) -> bool:
        """Whether ``fd`` is one of the lenders' sockets."""
        return fd in self.by_fd

    def on_ready(self, fd: int, events: int) -> None:
        """A lender's socket can be read or written."""
        pipe = self.by_fd[fd]
        if events & zmq.POLLOUT:
            self._flush(pipe)
        if events & zmq.POLLIN and pipe.pipe_id in self.pipes:
            self._read(pipe)

    def housekeeping(self, now: float) -> None:
        """Connect pipes whose lender listens; end leases whose lender or borrower is gone."""
        for lease in list(self.leases.values()):
            code = lease.proc.poll()
            if code is None and _stopped(lease.proc.pid):
                self.end(lease, "its lender was stopped (SIGSTOP): it would hold the borrower up")
            elif code is not None:
                said = "; ".join(lease.stderr)[-500:]
                why = f"its lender exited with code {code}" + (f": {said}" if said else "")
                self.end(lease, why)
            elif now - lease.seen > PIPE_SILENCE_S:
                self.end(lease, f"the borrower was silent for {PIPE_SILENCE_S:g} s", tell=False)
        for pipe in list(self.pipes.values()):
            if pipe.sock is None:
                self._connect(pipe, now)

    def close_all(self) -> None:
        """The hive is stopping: every lender goes."""
        for lease in list(self.leases.values()):
            self.end(lease, "the lending hive is stopping")

    def end(self, lease: Lease, reason: str, tell: bool = True) -> None:
        """End a lease: its pipes close, its lender is killed."""
        for pipe in [p for p in self.pipes.values() if p.lease is lease]:
            self.close(pipe, reason, tell)
        self.leases.pop(lease.lease_id, None)
        with contextlib.suppress(OSError):
            lease.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            lease.proc.wait(5)
        logger.info("lending ended", lease=lease.lease_id, model=lease.model, reason=reason)

    def close(self, pipe: Pipe, reason: str, tell: bool = True) -> None:
        """End a pipe (its lease goes on): the peer is told why, unless it asked."""
        self.pipes.pop(pipe.pipe_id, None)
        if pipe.sock is not None:
            self.by_fd.pop(pipe.sock.fileno(), None)
            with contextlib.suppress(KeyError):
                self.poller.unregister(pipe.sock.fileno())
            pipe.sock.close()
        if tell:
            self._send(pipe.lease, PipeClose(pipe_id=pipe.pipe_id, reason=reason[:1024]))

    # ------------------------------------------------------------------ the lender

    def _start(self, request: Request, frame: PipeOpen) -> Lease:
        with socket.socket() as probe:  # a free loopback port for the lender
            probe.bind(("127.0.0.1", 0))
            endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
        lent = self.lendable()
        argv, env = lender_command(endpoint, os.getpid(), self.cache_dir, self.threads, lent)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env({**self.engine_env, **env}),
        )
        lease = Lease(frame.lease, request.who, request.key, frame.model, endpoint, proc, lent)
        threading.Thread(target=_keep_stderr, args=(lease,), daemon=True).start()
        self.leases[lease.lease_id] = lease
        logger.info(
            "lending",
            lease=lease.lease_id,
            model=frame.model,
            lender=proc.pid,
            device=lent.label,
            free_mib=lent.free_bytes >> 20,
        )
        return lease

    def _connect(self, pipe: Pipe, now: float) -> None:
        host, port = pipe.lease.endpoint.rsplit(":", 1)
        sock = socket.socket()
        try:
            sock.settimeout(0.05)
            sock.connect((host, int(port)))
        except OSError:
            sock.close()
            if now - pipe.lease.started > LENDER_START_S:
                self.end(pipe.lease, f"its lender did not listen within {LENDER_START_S:g} s")
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe.sock = sock
        self.by_fd[sock.fileno()] = pipe
        self.poller.register(sock.fileno(), zmq.POLLIN)
        opened = PipeOpened(pipe_id=pipe.pipe_id, free_bytes=pipe.lease.lent.free_bytes)
        self.replies.send(Request(pipe.lease.who, pipe.rid, "hive", pipe.lease.key), opened)
        self._flush(pipe)

    def _flush(self, pipe: Pipe) -> None:
        """Write what the lender is owed; poll for writability while some is left."""
        if pipe.sock is None:
            return
        try:
            while pipe.out:
                chunk = pipe.out[0]
                sent = pipe.sock.send(chunk)
                pipe.out_bytes -= sent
                if sent < len(chunk):
                    pipe.out[0] = chunk[sent:]
                    break
                pipe.out.popleft()
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close(pipe, f"its lender's connection failed: {exc}")
            return
        if pipe.out_bytes > MAX_BUFFERED_BYTES:
            self.close(pipe, "its lender does not read what it is sent")
            return
        flags = zmq.POLLIN | (zmq.POLLOUT if pipe.out else 0)
        self.poller.modify(pipe.sock.fileno(), flags)

    def _read(self, pipe: Pipe) -> None:
        assert pipe.sock is not None
        try:
            data = read_burst(pipe.sock, PIPE_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(pipe, f"its lender's connection failed: {exc}")
            return
        if not data:
            self.close(pipe, "its lender closed the connection")
            return
        self._send(pipe.lease, PipeData(pipe_id=pipe.pipe_id, seq=pipe.seq_out, data=data))
        pipe.seq_out += 1

    def _send(self, lease: Lease, frame: PipeData | PipeClose) -> None:
        with contextlib.suppress(zmq.Again):  # a drop shows as a gap in the borrower's sequence
            self.replies.front.sock.send_multipart([lease.who, encode(frame)], zmq.NOBLOCK)


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (it would never answer: a stall, not a slow answer)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False


def _keep_stderr(lease: Lease) -> None:
    """The lender's last lines, for the reason a lease ended."""
    assert lease.proc.stderr is not None
    for raw in lease.proc.stderr:
        line = raw.decode("utf-8", "replace").strip()
        if line:
            lease.stderr.append(line)
