"""The hive's job desk schedules slots, not workers: driven with stand-ins for the pool, the
provisioner, the reply socket and the stream sockets (no sockets, no processes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rbee.errors import AllSlotsBusy, RbeeError
from rbee.hive.jobs import JobDesk
from rbee.hive.pool import Event
from rbee.hive.registry import Limits, WorkerRecord
from rbee.hive.request import Request
from rbee.hive.settings import HiveConfig
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    CancelJob,
    Done,
    Frame,
    GenerateParams,
    JobAccepted,
    RunJob,
    StartJob,
    StreamError,
    Token,
    stream_topic,
)

A = "/models/a.gguf"
KEEPER = Request(who=b"keeper", rid=1, role="admin")


class Pool:
    engine = SimpleNamespace(describe=lambda: "CPU backend")

    def __init__(self, *workers: WorkerRecord) -> None:
        self.workers = {w.worker_id: w for w in workers}
        self.sent: list[tuple[str, Frame]] = []

    def records(self) -> list[WorkerRecord]:
        return list(self.workers.values())

    def send(self, worker: WorkerRecord, frame: Frame) -> None:
        self.sent.append((worker.worker_id, frame))

    def signal_death(self, code: int) -> str:
        return f"killed by signal {-code}"

    def runs(self) -> list[tuple[str, str]]:
        """(worker, job) of every RunJob sent, in order."""
        return [(w, f.job_id) for w, f in self.sent if isinstance(f, RunJob)]


class Provisioner:
    catalog = SimpleNamespace(get=lambda name: None)  # no entry: a receipt without sha256

    def resolve(self, reference: str) -> Any:
        return SimpleNamespace(name="a", path=A, context_length=0)

    def scale_for(self, queue: list[Any]) -> None:
        pass


class Replies:
    def __init__(self) -> None:
        self.sent: list[tuple[Request, Frame]] = []
        self.errors: list[tuple[Request, RbeeError]] = []

    def send(self, request: Request, frame: Frame) -> None:
        self.sent.append((request, frame))

    def error(self, request: Request, exc: RbeeError) -> None:
        self.errors.append((request, exc))


class Sockets:
    """The XSUB (frames from workers, fed by the test) and the XPUB (frames to keepers)."""

    def __init__(self) -> None:
        self.inbox: list[list[bytes]] = []
        self.published: list[list[bytes]] = []

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        return self.inbox.pop(0)

    def send_multipart(self, parts: list[bytes], flags: int = 0) -> None:
        self.published.append(parts)

    def setsockopt(self, option: int, value: bytes) -> None:
        pass


def loaded(worker_id: str, slots: int, last_activity: float = 100.0) -> WorkerRecord:
    w = WorkerRecord(worker_id, "a", A, pid=1, slots=slots, last_activity=last_activity)
    w.became_idle(now=0.0, keep_alive_s=300.0)
    return w


def desk(tmp_path: Path, pool: Pool, max_queue: int = 16) -> tuple[JobDesk, Replies, Sockets]:
    config = HiveConfig(
        host="127.0.0.1",
        port=0,
        stream_port=0,
        data_dir=tmp_path,
        limits=Limits(max_queue=max_queue),
    )
    replies, sockets = Replies(), Sockets()
    made = JobDesk(
        config,
        "alpha",
        pool,  # type: ignore[arg-type]
        Provisioner(),  # type: ignore[arg-type]
        replies,  # type: ignore[arg-type]
        (sockets, sockets),  # type: ignore[arg-type]
        lambda: False,
    )
    return made, replies, sockets


def start(d: JobDesk, job_id: str, subscribe: bool = True, worker_id: str = "") -> None:
    """A keeper's StartJob, subscribed first as keepers do (unless told not to)."""
    if subscribe:
        assert d.gate.subscribe(stream_topic(job_id), "") == job_id
    params = GenerateParams(prompt="hi")
    d.on_start_job(KEEPER, StartJob(job_id=job_id, model="a", params=params, worker_id=worker_id))


def from_worker(d: JobDesk, sockets: Sockets, frame: Token | Done) -> None:
    sockets.inbox.append([stream_topic(frame.job_id), encode(frame)])
    d.on_stream()


def done(job_id: str, seq: int = 0) -> Done:
    return Done(
        job_id=job_id, seq=seq, tokens=seq, prompt_tokens=1, ttft_s=0, decode_s=0, stop_reason="eos"
    )


def test_jobs_fill_the_free_slots_and_a_freed_slot_takes_the_next_at_once(tmp_path: Path) -> None:
    w = loaded("w-1", slots=4)
    pool = Pool(w)
    d, replies, sockets = desk(tmp_path, pool)
    for i in range(5):
        start(d, f"j{i}")
    assert pool.runs() == [("w-1", f"j{i}") for i in range(4)]  # four run together
    assert [j.job_id for j in d.queue] == ["j4"]  # the fifth waits for a slot
    assert (w.state, w.job_ids, w.free_slots) == ("busy", ["j0", "j1", "j2", "j3"], 0)
    accepted = [f.job_id for _, f in replies.sent if isinstance(f, JobAccepted)]
    assert accepted == ["j0", "j1", "j2", "j3"]
    from_worker(d, sockets, Token(job_id="j2", seq=0, text="x"))
    from_worker(d, sockets, done("j2", seq=1))  # one ends: its slot goes to j4 right away
    assert pool.runs()[-1] == ("w-1", "j4") and not d.queue
    assert w.job_ids == ["j0", "j1", "j3", "j4"] and w.jobs_served == 1
    for job_id in ("j0", "j1", "j3"):
        from_worker(d, sockets, done(job_id))
    assert w.state == "busy"  # one job still runs: the keep-alive has not started
    from_worker(d, sockets, done("j4"))
    assert (w.state, w.job_ids, w.jobs_served, w.free_slots) == ("idle", [], 5, 4)


def test_a_job_goes_to_the_preferred_worker_else_the_most_free_slots(tmp_path: Path) -> None:
    one = loaded("w-one", slots=2, last_activity=200.0)
    one.start_job("other", 300.0)  # 1 free
    three = loaded("w-three", slots=4, last_activity=1.0)
    three.start_job("another", 300.0)  # 3 free
    pool = Pool(one, three)
    d, _, _ = desk(tmp_path, pool)
    start(d, "j-any")
    start(d, "j-pref", worker_id="w-one")
    assert pool.runs() == [("w-three", "j-any"), ("w-one", "j-pref")]


def test_all_slots_busy_only_when_no_slot_is_free_and_the_queue_is_full(tmp_path: Path) -> None:
    w = loaded("w-1", slots=3)
    pool = Pool(w)
    d, _, _ = desk(tmp_path, pool, max_queue=1)
    for i in range(3):  # not subscribed yet: they wait in the queue, but free slots cover them
        start(d, f"j{i}", subscribe=False)
    start(d, "j3", subscribe=False)  # no slot left for it: the one place in the queue
    with pytest.raises(AllSlotsBusy, match="queue is full \\(1 jobs waiting\\)") as refused:
        start(d, "j4", subscribe=False)
    assert refused.value.retry_after_s > 0
    assert "j4" not in d.jobs and len(d.queue) == 4


def test_a_worker_that_dies_ends_every_job_it_ran_after_its_frames(tmp_path: Path) -> None:
    w = loaded("w-1", slots=3)
    pool = Pool(w)
    d, _, sockets = desk(tmp_path, pool)
    for i in range(4):
        start(d, f"j{i}")
    for i in range(3):
        for seq in range(i + 1):
            from_worker(d, sockets, Token(job_id=f"j{i}", seq=seq, text="t"))
    del pool.workers["w-1"]  # the pool forgets a worker that exited, then says so
    d.on_worker_gone(Event("exited", w, exit_code=-9, stderr_tail="boom"))
    for i in range(3):
        job = d.jobs[f"j{i}"]
        assert job.finished and len(job.frames) == i + 2  # its tokens, then one terminal frame
        end = decode(job.frames[-1]).frame
        assert isinstance(end, StreamError) and end.code == "WORKER_CRASHED"
        assert end.seq == i + 1 and f"during job j{i}" in end.message
    assert not d.jobs["j3"].finished and d.queue == [d.jobs["j3"]]  # it never ran there


def test_stopping_a_worker_cancels_every_job_it_runs(tmp_path: Path) -> None:
    w = loaded("w-1", slots=2)
    bystander = loaded("w-2", slots=1)
    pool = Pool(w, bystander)
    d, _, _ = desk(tmp_path, pool)
    for i in range(3):
        start(d, f"j{i}", worker_id="w-1" if i < 2 else "w-2")
    assert pool.runs() == [("w-1", "j0"), ("w-1", "j1"), ("w-2", "j2")]
    d.cancel_on(w, "an admin stopping worker w-1")
    cancels = [(wid, f.job_id) for wid, f in pool.sent if isinstance(f, CancelJob)]
    assert cancels == [("w-1", "j0"), ("w-1", "j1")]
    assert d.jobs["j0"].canceled_by == d.jobs["j1"].canceled_by == "an admin stopping worker w-1"
    assert not d.jobs["j2"].canceled_by
    w.state = "stopping"
    del pool.workers["w-1"]
    d.on_worker_gone(Event("exited", w, exit_code=0))
    for job_id in ("j0", "j1"):
        end = decode(d.jobs[job_id].frames[-1]).frame
        assert isinstance(end, StreamError) and end.code == "JOB_STOPPED"
