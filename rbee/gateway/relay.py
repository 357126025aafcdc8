"""A job's tokens read on the event loop, not on the job's thread.

Each request's keeper work runs on a thread of its own (rbee.gateway.jobs), and that thread
would wake for every token only to wake the event loop in turn: on a machine whose cores decode,
every wake-up is taken from llama.cpp, and on a GPU the gateway's one interpreter tops out at
about a thousand tokens/s that way. So once a worker has taken the job, the thread lends its
SUB socket to the loop (a ZeroMQ socket may change threads across a full memory barrier: the
thread waits on an Event meanwhile), and the loop reads it whenever its file descriptor says so,
turning each in-order token straight into a Text event for the HTTP side.

The loop gives the socket back at the terminal frame (the thread then ends the job as always),
and at anything unusual: a gap in the sequence numbers, a frame it cannot decode, a silence of
IDLE_CHECK_S, or a stop. The thread then goes on with the keeper's JobStream from the same
sequence number, which fetches what is missing from the hive, so every promise of the stream
(no token lost or repeated, exactly one terminal frame) is kept by the one implementation of it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import zmq

from rbee.errors import RbeeError
from rbee.keeper.job import JobEvent, Text
from rbee.keeper.stream import IDLE_CHECK_S, JobStream, StreamFrame
from rbee.protocol.messages import Token
from rbee.transport.sockets import StreamSubscriber

GIVE_BACK_WAIT_S = 2.0  # a stopping loop that does not answer: the thread takes its socket back


class LoopReader:
    """Reads one job's stream on the event loop until its end or anything unusual."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sub: StreamSubscriber,
        stream: JobStream,
        deliver: Callable[[JobEvent], None],
    ) -> None:
        self.loop = loop
        self.sock = sub.sock
        self.stream = stream
        self.deliver = deliver
        self.done = threading.Event()  # set on the loop when the socket is the thread's again
        self.last: StreamFrame | None = None  # the terminal frame, when that is what ended it
        self._fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._last_frame = 0.0  # loop time of the last frame read

    # ------------------------------------------------------------------ on the job's thread

    def run(self, stopped: threading.Event, check_s: float) -> StreamFrame | None:
        """Lend the socket to the loop and wait until it comes back (``stopped``: ask for it
        back); the terminal frame, or None when the thread's JobStream must go on."""
        try:
            self.loop.call_soon_threadsafe(self._start)
        except RuntimeError:  # the loop is closed: nobody else reads it
            return None
        asked_back = False
        while not self.done.wait(check_s):
            if stopped.is_set() and not asked_back:
                asked_back = True
                try:
                    self.loop.call_soon_threadsafe(self._give_back, False)
                except RuntimeError:
                    return None
                if not self.done.wait(GIVE_BACK_WAIT_S):
                    return None  # the loop no longer runs: the socket is idle
        return self.last

    # ------------------------------------------------------------------ on the loop

    def _start(self) -> None:
        if self.done.is_set():
            return
        self._fd = int(self.sock.getsockopt(zmq.FD))
        self.loop.add_reader(self._fd, self._readable)
        self._last_frame = self.loop.time()
        self._timer = self.loop.call_later(IDLE_CHECK_S, self._watch_silence)
        self._readable()  # frames that came before the reader was added raise no event

    def _watch_silence(self) -> None:
        """One timer for the whole stream, not one per token: it looks again when the last
        frame would be IDLE_CHECK_S old, and gives the socket back once it is."""
        quiet = self.loop.time() - self._last_frame
        if quiet >= IDLE_CHECK_S:
            self._give_back(True)
        elif not self.done.is_set():
            self._timer = self.loop.call_later(IDLE_CHECK_S - quiet, self._watch_silence)

    def _readable(self) -> None:
        """Every frame waiting now (ZeroMQ's descriptor signals edges, not levels)."""
        stream = self.stream
        try:
            while not self.done.is_set() and self._pending():
                frame = stream.decode(self.sock.recv_multipart(zmq.NOBLOCK)[-1])
                if frame.seq < stream.next_seq:
                    continue  # one fetched already
                if frame.seq > stream.next_seq:
                    self._give_back(True)  # a gap: the thread fetches it
                    return
                stream.next_seq += 1
                if not isinstance(frame, Token):
                    self.last = frame
                    self._give_back(False)
                    return
                if frame.text or frame.probs:
                    self.deliver(Text(frame.text, frame.count, probs=tuple(frame.probs)))
                self._last_frame = self.loop.time()
        except (zmq.ZMQError, RbeeError):  # a frame it cannot read: the thread decides
            self._give_back(True)

    def _pending(self) -> bool:
        events = self.sock.getsockopt(zmq.EVENTS)
        return isinstance(events, int) and bool(events & zmq.POLLIN)

    def _give_back(self, fetch: bool) -> None:
        if self.done.is_set():
            return
        if self._fd >= 0:
            self.loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
        self.stream.fetch_first = fetch and self.last is None
        self.done.set()
