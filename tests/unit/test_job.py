"""Unit tests for rbee.keeper.job.InferJob, the job loop `rbee infer` and `rbee serve` share,
with an in-memory hive (scripted answers per request type) and SUB."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import rbee.keeper.job as job_module
import rbee.keeper.stream as stream_module
from rbee.errors import (
    AllSlotsBusy,
    Canceled,
    HiveLost,
    HiveUnreachable,
    JobStopped,
    Timeout,
    WorkerNotFound,
)
from rbee.keeper.job import (
    Deadline,
    Failed,
    Finished,
    InferJob,
    InferRequest,
    JobEvent,
    Progress,
    Started,
    Text,
    Waiting,
)
from rbee.keeper.link import HiveLink
from rbee.protocol.codec import encode
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Done,
    EnsureWorker,
    FetchFrames,
    Frame,
    FramesReply,
    GenerateParams,
    HelloReply,
    JobAccepted,
    StartJob,
    Token,
    WorkerAssigned,
)
from rbee.protocol.messages import Progress as ProgressFrame

MODEL = "hf:org/repo"
REQUEST = InferRequest(MODEL, GenerateParams(prompt="hi", max_tokens=3))
WORKER = "w-0000beef"
MAX_WAITS = 5000  # a job that never ends fails the test instead of hanging it

Script = list[Any]  # per request: Frames to answer with, exceptions to raise, floats to sleep


def download(done: float) -> ProgressFrame:
    return ProgressFrame(phase="download", done=done, total=100.0, message="1 MB/s")


ASSIGNED = WorkerAssigned(worker_id=WORKER, model=MODEL, reused=False, load_s=0.5)
COLD: Script = [
    ProgressFrame(phase="spawn", message="spawned worker"),
    ProgressFrame(phase="loading", done=0.5, total=1.0),
    ASSIGNED,
]


def accepted(frame: StartJob) -> JobAccepted:
    return JobAccepted(job_id=frame.job_id, worker_id=WORKER)


class FakeClient:
    """The request side of a hive: each request of a type takes the next script of that type;
    ``replies`` hands out its answers one wait at a time, as DealerClient does."""

    endpoint = "tcp://127.0.0.1:7830"
    curve = None

    def __init__(self, scripts: dict[type[Frame], list[Script]]) -> None:
        self.scripts = scripts
        self.sent: list[Frame] = []
        self.answers: dict[int, Script] = {}
        self.waits = 0

    def send(self, frame: Frame) -> int:
        self.sent.append(frame)
        self.answers[len(self.sent)] = list(self.scripts[type(frame)].pop(0))
        return len(self.sent)

    def replies(self, rid: int, timeout_s: float) -> Iterator[Frame]:
        self.waits += 1
        assert self.waits < MAX_WAITS, "the job keeps waiting and never ends"
        answers = self.answers[rid]
        while answers and isinstance(answers[0], float):
            time.sleep(answers.pop(0))
        if not answers:
            time.sleep(timeout_s)
            raise HiveUnreachable("silence")
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            answer = answer(self.sent[rid - 1])
        yield answer

    def request(self, frame: Frame, timeout_s: float) -> Frame:
        self.sent.append(frame)
        if isinstance(frame, FetchFrames):
            return FramesReply(job_id=frame.job_id, frames=[], finished=False)
        return Ack()

    def of_type(self, kind: type[Frame]) -> list[Any]:
        return [f for f in self.sent if isinstance(f, kind)]


class FakeSub:
    """The SUB socket: the stream frames of whichever job it was subscribed to, built from
    ``frames`` (functions of the job id) when it subscribes."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames
        self.items: list[bytes] = []
        self.closed = False

    def subscribe(self, job_id: str) -> None:
        self.items = [encode(make(job_id)) for make in self.frames]

    def recv(self, timeout_s: float) -> bytes | None:
        return self.items.pop(0) if self.items else None

    def has_pending(self) -> bool:
        return bool(self.items)

    def close(self) -> None:
        self.closed = True


def token(seq: int, text: str = "x") -> Any:
    return lambda job_id: Token(job_id=job_id, seq=seq, text=text)


def done(seq: int, reason: str = "length", tail: str = "") -> Any:
    return lambda job_id: Done(
        job_id=job_id,
        seq=seq,
        tokens=seq,
        prompt_tokens=2,
        ttft_s=0.01,
        decode_s=0.02,
        stop_reason=reason,
        tail=tail,
    )


STREAM = [token(0, "a"), token(1, ""), token(2, "b"), done(3, tail="!")]


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_module, "STOP_CHECK_S", 0.005)
    monkeypatch.setattr(job_module, "WAIT_TIMEOUT_S", 0.1)
    monkeypatch.setattr(job_module, "BUSY_BACKOFF_S", 0.01)
    monkeypatch.setattr(stream_module, "IDLE_CHECK_S", 0.005)


def setup(
    monkeypatch: pytest.MonkeyPatch,
    scripts: dict[type[Frame], list[Script]],
    stream: list[Any] = STREAM,
) -> tuple[HiveLink, FakeClient, list[FakeSub]]:
    client = FakeClient(scripts)
    hello = HelloReply(
        node="alpha",
        rbee_version="0",
        protocol_version=PROTOCOL_VERSION,
        pid=1,
        stream_port=7831,
        status="ok",
    )
    link = HiveLink(None, client, "127.0.0.1", hello)  # type: ignore[arg-type]
    subs: list[FakeSub] = []

    def subscriber(*_: Any) -> FakeSub:
        subs.append(FakeSub(stream))
        return subs[-1]

    monkeypatch.setattr(job_module, "StreamSubscriber", subscriber)
    return link, client, subs


def run(job: InferJob, until: Any = None) -> list[JobEvent]:
    """Every event; ``until(event)`` is called on each (it may set what stops the job)."""
    got = []
    for event in job.events():
        got.append(event)
        if until is not None:
            until(event)
    return got


def test_a_cold_job_says_each_phase_then_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    link, client, subs = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[accepted]]})
    job = InferJob(link, REQUEST)
    events = run(job)
    assert events[:3] == [
        Waiting("worker", "spawned worker"),
        Progress("loading", 0.5, 1.0),
        Waiting("ready", f"worker {WORKER} loaded {MODEL} in 0.50 s"),
    ]
    started = events[3]
    assert isinstance(started, Started) and started.accepted is not None
    assert started == Started("alpha", WORKER, job.job_id, False, started.accepted)
    assert started.accepted.worker_id == WORKER
    texts = [e for e in events if isinstance(e, Text)]
    assert [(t.text, t.tokens) for t in texts] == [
        ("a", 1),
        ("", 1),
        ("b", 1),
        ("!", 0),
    ]
    assert isinstance(events[-1], Finished) and events[-1].done.tokens == 3
    assert subs[0].closed and not client.of_type(Cancel)


def test_a_stop_during_the_download_ends_the_wait_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway's bug: while a model downloads, a client gone went unnoticed."""
    pulling: Script = [download(i) for i in range(1000)]
    link, client, subs = setup(monkeypatch, {EnsureWorker: [pulling]})
    stopped = False

    def stop(event: JobEvent) -> None:
        nonlocal stopped
        stopped = stopped or isinstance(event, Progress)

    events = run(InferJob(link, REQUEST, should_stop=lambda: stopped), until=stop)
    assert [e for e in events if isinstance(e, Progress)] == [
        Progress("download", 0, 100, "1 MB/s")
    ]
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Canceled)
    assert not client.of_type(StartJob) and not client.of_type(Cancel), "no job to cancel yet"
    assert subs[0].closed


def test_a_stop_notices_a_silent_hive_too(monkeypatch: pytest.MonkeyPatch) -> None:
    link, _, _ = setup(monkeypatch, {EnsureWorker: [[]]})  # the hive says nothing
    monkeypatch.setattr(job_module, "WAIT_TIMEOUT_S", 60.0)
    asked = time.monotonic()
    events = run(InferJob(link, REQUEST, should_stop=lambda: time.monotonic() - asked > 0.05))
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Canceled)
    assert time.monotonic() - asked < 1.0


def test_the_ready_deadline_passes_while_the_model_downloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pulling: Script = [x for i in range(1000) for x in (0.005, download(i))]
    link, _, _ = setup(monkeypatch, {EnsureWorker: [pulling]})
    events = run(InferJob(link, REQUEST, ready=Deadline.after(0.05)))
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Timeout)
    assert "not ready within 0.05 s" in events[-1].error.message
    assert len(events) < 100


def test_all_slots_busy_is_retried_with_backoff_and_a_new_job_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = AllSlotsBusy("all 1 workers of alpha are busy", retry_after_s=0.02)
    link, client, _ = setup(
        monkeypatch, {EnsureWorker: [COLD] * 3, StartJob: [[busy], [busy], [accepted]]}
    )
    job = InferJob(link, REQUEST, job_id="j-first")
    events = run(job)
    said = [e.message for e in events if isinstance(e, Waiting) and e.phase == "busy"]
    assert said == [f"{busy.message}; retrying in 0.0 s"] * 2
    started = [e for e in events if isinstance(e, Started)]
    ids = [f.job_id for f in client.of_type(StartJob)]
    assert ids[0] == "j-first" and len(set(ids)) == 3 and started[0].job_id == ids[-1]
    assert isinstance(events[-1], Finished)


def test_all_slots_busy_is_the_answer_after_the_last_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = AllSlotsBusy("busy", retry_after_s=0.0)
    attempts = job_module.BUSY_ATTEMPTS
    link, client, _ = setup(monkeypatch, {EnsureWorker: [[busy]] * attempts})
    events = run(InferJob(link, REQUEST))
    assert isinstance(events[-1], Failed) and events[-1].error is busy
    assert len(client.of_type(EnsureWorker)) == attempts


def test_a_stop_while_queued_cancels_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    queued: Script = [ProgressFrame(phase="queued", message="position 1 of 1")] * 1000
    link, client, subs = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [queued]})
    stopped = False

    def stop(event: JobEvent) -> None:
        nonlocal stopped
        stopped = stopped or (isinstance(event, Waiting) and event.phase == "queue")

    job = InferJob(link, REQUEST, should_stop=lambda: stopped)
    events = run(job, until=stop)
    queue = [e for e in events if isinstance(e, Waiting) and e.phase == "queue"]
    assert queue == [Waiting("queue", "waiting for a free slot: position 1 of 1")]
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, Canceled)
    assert [c.job_id for c in client.of_type(Cancel)] == [job.job_id] and subs[0].closed


def test_a_reader_that_leaves_mid_stream_cancels_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    link, client, subs = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[accepted]]})
    job = InferJob(link, REQUEST)
    events = job.events()
    for event in events:
        if isinstance(event, Text):
            break  # e.g. stdout failed, or Ctrl-C
    events.close()
    assert job.submitted and [c.job_id for c in client.of_type(Cancel)] == [job.job_id]
    assert subs[0].closed


def test_a_finished_job_is_not_canceled(monkeypatch: pytest.MonkeyPatch) -> None:
    link, client, _ = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[accepted]]})
    events = InferJob(link, REQUEST).events()
    for event in events:
        if isinstance(event, Finished):
            break
    events.close()
    assert not client.of_type(Cancel)


def test_a_job_the_hive_ended_is_job_stopped_after_its_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = [token(0, "a"), done(1, reason="canceled", tail="b")]
    link, client, _ = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[accepted]]}, stream)
    events = run(InferJob(link, REQUEST))
    assert [e.text for e in events if isinstance(e, Text)] == ["a", "b"]
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, JobStopped)
    assert not client.of_type(Cancel)


def test_a_hive_silent_past_the_wait_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    link, _, _ = setup(monkeypatch, {EnsureWorker: [[ProgressFrame(phase="spawn")]]})
    events = run(InferJob(link, REQUEST))
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, HiveLost)
    assert "hive alpha stopped answering" in events[-1].error.message
    assert "within 0.1 s" in events[-1].error.message


def test_the_idle_worker_of_the_status_is_used_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """StartJob goes straight to the idle worker the status showed; when it is gone by then,
    the retry asks the hive (EnsureWorker) instead of the status."""
    gone = WorkerNotFound(f"no worker {WORKER}")
    link, client, _ = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[gone], [accepted]]})
    idle = SimpleNamespace(
        worker_id=WORKER,
        model=MODEL,
        state="idle",
        backend="cpu",
        device="",
        slots=1,
        slots_busy=0,
        n_ctx=4096,
    )
    link.status = SimpleNamespace(workers=[idle])  # type: ignore[assignment]
    events = run(InferJob(link, REQUEST))
    assert events[0] == Waiting("worker", f"reusing worker {WORKER} ({MODEL}): a slot is free")
    assert client.of_type(StartJob)[0].worker_id == WORKER
    assert len(client.of_type(EnsureWorker)) == 1 and link.status is None
    assert isinstance(events[-1], Finished)


@pytest.mark.parametrize(("busy", "direct"), [(3, True), (4, False)])
def test_a_status_worker_is_used_only_with_a_free_slot(
    monkeypatch: pytest.MonkeyPatch, busy: int, direct: bool
) -> None:
    """A worker running jobs takes another while a slot is free; with every slot busy the
    keeper asks the hive (EnsureWorker) instead."""
    link, client, _ = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[accepted]]})
    shown = SimpleNamespace(
        worker_id=WORKER,
        model=MODEL,
        state="busy",
        backend="cpu",
        device="",
        slots=4,
        slots_busy=busy,
        n_ctx=4096,
    )
    link.status = SimpleNamespace(workers=[shown])  # type: ignore[assignment]
    events = run(InferJob(link, REQUEST))
    assert len(client.of_type(EnsureWorker)) == (0 if direct else 1)
    if direct:
        assert events[0] == Waiting("worker", f"reusing worker {WORKER} ({MODEL}): a slot is free")
    assert isinstance(events[-1], Finished)


@pytest.mark.parametrize(("has", "asked", "direct"), [(4096, 4096, True), (2048, 4096, False)])
def test_a_status_worker_is_used_only_with_the_context_asked_for(
    monkeypatch: pytest.MonkeyPatch, has: int, asked: int, direct: bool
) -> None:
    """A worker whose slots hold less context than the request asks for is not used: the
    keeper asks the hive, passing the context on (EnsureWorker and StartJob)."""
    link, client, _ = setup(monkeypatch, {EnsureWorker: [COLD], StartJob: [[accepted]]})
    shown = SimpleNamespace(
        worker_id=WORKER,
        model=MODEL,
        state="idle",
        backend="cpu",
        device="",
        slots=1,
        slots_busy=0,
        n_ctx=has,
    )
    link.status = SimpleNamespace(workers=[shown])  # type: ignore[assignment]
    events = run(InferJob(link, dataclasses.replace(REQUEST, n_ctx=asked)))
    ensured = client.of_type(EnsureWorker)
    assert len(ensured) == (0 if direct else 1)
    assert all(e.n_ctx == asked for e in ensured)
    assert client.of_type(StartJob)[0].n_ctx == asked
    assert isinstance(events[-1], Finished)
