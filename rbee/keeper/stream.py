"""Receiving one job's token stream without losing or repeating a token.

PUB/SUB may drop frames (a slow reader at its high-water mark). Every frame has a sequence
number, so a gap is seen at once; the missing range is then fetched from the hive, which keeps
each job's frames. Silence is also checked: after IDLE_CHECK_S without a frame the keeper asks
the hive directly, so even a lost terminal frame is recovered and nothing waits forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from rbee.errors import HiveLost, HiveUnreachable, ProtocolError, RbeeError, error_from_code
from rbee.protocol.codec import decode
from rbee.protocol.messages import Done, FetchFrames, FramesReply, StreamError, Token
from rbee.transport.sockets import DealerClient, StreamSubscriber

IDLE_CHECK_S = 1.0
FETCH_TIMEOUT_S = 1.5
FETCH_ATTEMPTS = 2  # a dead hive is reported (HIVE_LOST) about 4 s after its last frame

StreamFrame = Token | Done | StreamError


def _carry_on() -> None:
    """The default ``check`` of a JobStream: nothing ends it but its terminal frame."""


class JobStream:
    """Yields a job's frames in order, each sequence number exactly once, ending with the
    terminal frame (Done or StreamError).

    ``check`` is called after every IDLE_CHECK_S without a frame, before the hive is asked, so
    a reader that stops early (by raising from it) notices during a silence too, e.g. while a
    long prompt is read before the first token."""

    def __init__(
        self,
        client: DealerClient,
        sub: StreamSubscriber,
        job_id: str,
        check: Callable[[], None] = _carry_on,
    ) -> None:
        self.client = client
        self.sub = sub
        self.job_id = job_id
        self.check = check
        self.next_seq = 0
        self.fetched = 0  # frames recovered over request/reply (a measure of PUB/SUB loss)
        self.fetch_first = False  # another reader stopped at a gap or a silence: ask at once

    def __iter__(self) -> Iterator[StreamFrame]:
        while True:
            if self.fetch_first:
                self.fetch_first, data = False, None
            else:
                data = self.sub.recv(IDLE_CHECK_S)
                if data is None:
                    self.check()
            frames = self._fetch() if data is None else [self.decode(data)]
            for frame in frames:
                if frame.seq > self.next_seq:
                    frames_gap = self._fetch()
                    yield from self._in_order(frames_gap)
                    if self._ended(frames_gap):
                        return
                if frame.seq == self.next_seq:
                    self.next_seq += 1
                    yield frame
                    if not isinstance(frame, Token):
                        return

    def _in_order(self, frames: list[StreamFrame]) -> Iterator[StreamFrame]:
        for frame in frames:
            if frame.seq == self.next_seq:
                self.next_seq += 1
                yield frame

    def _ended(self, frames: list[StreamFrame]) -> bool:
        return any(not isinstance(f, Token) and f.seq < self.next_seq for f in frames)

    def decode(self, data: bytes) -> StreamFrame:
        frame = decode(data).frame
        if not isinstance(frame, Token | Done | StreamError) or frame.job_id != self.job_id:
            raise ProtocolError(f"unexpected frame on the stream of job {self.job_id}")
        return frame

    def _fetch(self) -> list[StreamFrame]:
        """Ask the hive for every frame from ``next_seq`` on."""
        for attempt in range(FETCH_ATTEMPTS):
            try:
                reply = self.client.request(
                    FetchFrames(job_id=self.job_id, from_seq=self.next_seq), FETCH_TIMEOUT_S
                )
                break
            except HiveUnreachable:
                if attempt + 1 == FETCH_ATTEMPTS:
                    raise HiveLost(
                        f"the hive stopped answering during job {self.job_id} "
                        f"after {self.next_seq} frames",
                        suggestion="check that the hive is still running",
                    ) from None
        if not isinstance(reply, FramesReply):
            raise ProtocolError(f"FetchFrames answered with {reply.TYPE}")
        frames = [self.decode(data) for data in reply.frames]
        self.fetched += sum(1 for f in frames if f.seq >= self.next_seq)
        return frames


def describe(frame: StreamError) -> RbeeError:
    """The exception a terminal error frame stands for."""
    return error_from_code(frame.code, frame.message, suggestion=frame.suggestion)
