"""Unit tests for rbee.keeper.stream.JobStream, with in-memory fakes for the hive and the SUB."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

import rbee.keeper.stream as stream_module
from rbee.errors import (
    HiveLost,
    HiveUnreachable,
    JobNotFound,
    ProtocolError,
    VersionMismatch,
    WorkerCrashed,
)
from rbee.keeper.stream import FETCH_ATTEMPTS, FETCH_TIMEOUT_S, JobStream, describe
from rbee.protocol.codec import encode
from rbee.protocol.messages import (
    Ack,
    Done,
    FetchFrames,
    Frame,
    FramesReply,
    StreamError,
    Token,
)

JOB = "job-42"
Unreachable = HiveUnreachable("no answer")
MAX_CALLS = 1000  # a stream that never ends fails the test instead of hanging it


def tok(seq: int, job: str = JOB) -> Token:
    return Token(job_id=job, seq=seq, text=f"t{seq} ", token_id=seq + 100)


def done(seq: int, job: str = JOB) -> Done:
    return Done(
        job_id=job,
        seq=seq,
        tokens=seq,
        prompt_tokens=5,
        ttft_s=0.01,
        decode_s=0.5,
        stop_reason="length",
    )


def job_frames(n_tokens: int, terminal: Frame | None = None) -> list[Frame]:
    return [*(tok(i) for i in range(n_tokens)), terminal or done(n_tokens)]


class FakeSub:
    """Hands out queued payloads; None (silence) once they run out or where queued."""

    def __init__(self, items: Iterable[Frame | bytes | None]) -> None:
        self.items = [encode(i) if isinstance(i, Frame) else i for i in items]
        self.timeouts: list[float] = []

    def recv(self, timeout_s: float) -> bytes | None:
        assert len(self.timeouts) < MAX_CALLS, "the stream keeps waiting and never ends"
        self.timeouts.append(timeout_s)
        return self.items.pop(0) if self.items else None


class FakeHive:
    """The request side: answers FetchFrames from the frames the hive holds for the job.

    ``script`` lists, per request, what to do: "ok" (answer from ``held``), an exception to
    raise, or a Frame to answer with; once it runs out every request answers "ok".
    """

    def __init__(self, held: list[Frame], script: Iterable[Any] = ()) -> None:
        self.held = held
        self.script = list(script)
        self.requests: list[tuple[FetchFrames, float]] = []

    def request(self, frame: Frame, timeout_s: float) -> Frame:
        assert isinstance(frame, FetchFrames), frame
        assert len(self.requests) < MAX_CALLS, "the stream keeps fetching and never ends"
        self.requests.append((frame, timeout_s))
        action = self.script.pop(0) if self.script else "ok"
        if isinstance(action, BaseException):
            raise action
        if isinstance(action, Frame):
            return action
        frames = [f for f in self.held if getattr(f, "seq", -1) >= frame.from_seq]
        finished = any(isinstance(f, Done | StreamError) for f in self.held)
        return FramesReply(
            job_id=frame.job_id, frames=[encode(f) for f in frames], finished=finished
        )

    @property
    def from_seqs(self) -> list[int]:
        return [r.from_seq for r, _ in self.requests]


def collect(hive: FakeHive, sub: FakeSub, job_id: str = JOB) -> tuple[list[Frame], JobStream]:
    js = JobStream(hive, sub, job_id)  # type: ignore[arg-type]
    got: list[Frame] = []
    for frame in js:
        got.append(frame)
        assert len(got) < 10_000, "stream did not end"
    return got, js


@pytest.fixture(autouse=True)
def _fast_idle_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "IDLE_CHECK_S", 0.01)


def seqs(frames: list[Frame]) -> list[int]:
    return [f.seq for f in frames]  # type: ignore[attr-defined]


def test_clean_stream_needs_no_fetch() -> None:
    frames = job_frames(5)
    hive = FakeHive(frames)
    sub = FakeSub(frames)
    got, js = collect(hive, sub)
    assert got == frames
    assert isinstance(got[-1], Done)
    assert hive.requests == []
    assert js.fetched == 0
    assert js.next_seq == 6
    assert sub.timeouts == [0.01] * 6  # IDLE_CHECK_S is read at call time


def test_stream_ends_at_the_terminal_frame() -> None:
    frames = job_frames(2)
    sub = FakeSub([*frames, tok(3)])  # anything after the terminal frame is not read
    got, _ = collect(FakeHive(frames), sub)
    assert got == frames
    assert len(sub.items) == 1


def test_stream_error_is_a_terminal_frame() -> None:
    err = StreamError(job_id=JOB, seq=2, code="WORKER_CRASHED", message="worker died")
    frames = job_frames(2, err)
    got, _ = collect(FakeHive(frames), FakeSub(frames))
    assert got == frames
    exc = describe(err)
    assert isinstance(exc, WorkerCrashed)
    assert exc.message == "worker died"


def test_gap_is_filled_from_the_hive() -> None:
    frames = job_frames(6)  # tokens 0..5, Done seq 6
    hive = FakeHive(frames)
    sub = FakeSub([frames[0], frames[1], frames[4]])  # 2 and 3 were dropped, then silence
    got, js = collect(hive, sub)
    assert seqs(got) == [0, 1, 2, 3, 4, 5, 6]
    assert got == frames
    assert hive.from_seqs == [2]
    assert hive.requests[0][1] == FETCH_TIMEOUT_S
    assert hive.requests[0][0].job_id == JOB
    assert js.fetched == 5  # seq 2..6 came over request/reply


def test_gap_fetch_that_does_not_reach_the_end_continues_from_the_stream() -> None:
    frames = job_frames(6)
    # when the keeper sees seq 3, the hive holds only up to 3; the rest comes over PUB/SUB
    hive = FakeHive(frames[:4])
    sub = FakeSub([frames[0], frames[3], frames[3], frames[4], frames[5], frames[6]])
    got, _ = collect(hive, sub)
    assert got == frames
    assert hive.from_seqs == [1]


def test_duplicates_are_dropped() -> None:
    frames = job_frames(3)
    hive = FakeHive(frames)
    sub = FakeSub([frames[0], frames[0], frames[1], frames[0], frames[2], frames[2], frames[3]])
    got, js = collect(hive, sub)
    assert got == frames
    assert hive.requests == []
    assert js.fetched == 0


def test_late_stream_frames_after_a_fetch_are_dropped() -> None:
    frames = job_frames(4)
    hive = FakeHive(frames[:3])  # holds 0..2 when asked
    sub = FakeSub([frames[0], frames[2], frames[1], frames[2], frames[3], frames[4]])
    got, _ = collect(hive, sub)
    assert got == frames
    assert seqs(got) == [0, 1, 2, 3, 4]


def test_silence_triggers_a_fetch_that_recovers_the_terminal_frame() -> None:
    frames = job_frames(3)
    hive = FakeHive(frames)
    sub = FakeSub([frames[0], frames[1]])  # then only silence: token 2 and Done were lost
    got, js = collect(hive, sub)
    assert got == frames
    assert hive.from_seqs == [2]
    assert js.fetched == 2


def test_silence_with_nothing_new_keeps_waiting() -> None:
    frames = job_frames(2)
    hive = FakeHive(frames[:1])  # the job is slow: only token 0 so far
    sub = FakeSub([frames[0], None, None, frames[1], frames[2]])
    got, js = collect(hive, sub)
    assert got == frames
    assert hive.from_seqs == [1, 1]
    assert js.fetched == 0


def test_a_reader_can_stop_during_a_silence() -> None:
    """``check`` runs at every silence, before the hive is asked; what it raises ends the
    stream (a job no longer wanted, while a long prompt is read before the first token)."""
    frames = job_frames(2)
    hive = FakeHive(frames[:1])
    silences = 0

    def check() -> None:
        nonlocal silences
        silences += 1
        if silences == 2:
            raise KeyboardInterrupt

    js = JobStream(hive, FakeSub([frames[0], None]), JOB, check)  # type: ignore[arg-type]
    got = []
    with pytest.raises(KeyboardInterrupt):
        got.extend(js)
    assert got == frames[:1] and hive.from_seqs == [1], "the second silence asked nobody"


def test_silence_from_the_very_start() -> None:
    frames = job_frames(2)
    hive = FakeHive(frames)
    got, _ = collect(hive, FakeSub([]))
    assert got == frames
    assert hive.from_seqs == [0]


def test_one_unanswered_fetch_is_retried() -> None:
    frames = job_frames(2)
    hive = FakeHive(frames, script=[Unreachable])
    got, _ = collect(hive, FakeSub([frames[0]]))
    assert got == frames
    assert hive.from_seqs == [1, 1]


def test_hive_never_answers() -> None:
    hive = FakeHive([], script=[Unreachable] * 10)
    js = JobStream(hive, FakeSub([tok(0)]), JOB)  # type: ignore[arg-type]
    got: list[Frame] = []
    with pytest.raises(HiveLost) as exc:
        for frame in js:
            got.append(frame)
    assert got == [tok(0)]
    assert len(hive.requests) == FETCH_ATTEMPTS
    assert JOB in exc.value.message
    assert "after 1 frames" in exc.value.message
    assert exc.value.retryable is True
    assert exc.value.suggestion


def test_hive_never_answers_a_gap_fetch() -> None:
    hive = FakeHive([], script=[Unreachable] * 10)
    js = JobStream(hive, FakeSub([tok(0), tok(5)]), JOB)  # type: ignore[arg-type]
    with pytest.raises(HiveLost):
        list(js)
    assert hive.from_seqs == [1] * FETCH_ATTEMPTS


def test_other_hive_errors_propagate() -> None:
    hive = FakeHive([], script=[JobNotFound("no job job-42")])
    js = JobStream(hive, FakeSub([]), JOB)  # type: ignore[arg-type]
    with pytest.raises(JobNotFound):
        list(js)


def test_fetch_answered_with_the_wrong_frame_type() -> None:
    hive = FakeHive([], script=[Ack()])
    with pytest.raises(ProtocolError, match="FetchFrames answered with ack"):
        list(JobStream(hive, FakeSub([]), JOB))  # type: ignore[arg-type]


def test_frame_for_another_job_is_a_protocol_error() -> None:
    hive = FakeHive(job_frames(2))
    js = JobStream(hive, FakeSub([tok(0), tok(1, job="job-other")]), JOB)  # type: ignore[arg-type]
    got: list[Frame] = []
    with pytest.raises(ProtocolError, match=JOB):
        for frame in js:
            got.append(frame)
    assert got == [tok(0)]


def test_fetched_frame_for_another_job_is_a_protocol_error() -> None:
    hive = FakeHive([tok(0, job="job-other")])
    with pytest.raises(ProtocolError):
        list(JobStream(hive, FakeSub([]), JOB))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (encode(Ack()), ProtocolError),  # not a stream frame
        (b"\xc1garbage", ProtocolError),
        (b"\x80", VersionMismatch),  # an empty map: no protocol version
    ],
)
def test_non_stream_payload_on_the_stream(payload: bytes, error: type[Exception]) -> None:
    js = JobStream(FakeHive([]), FakeSub([payload]), JOB)  # type: ignore[arg-type]
    with pytest.raises(error):
        list(js)
