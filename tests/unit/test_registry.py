"""Unit tests for rbee.hive.registry: the hive's pure decisions about workers and jobs."""

from __future__ import annotations

import math
import time

from rbee.hive.registry import (
    JOB_RETENTION_S,
    MAX_FINISHED_BYTES,
    MAX_FINISHED_JOBS,
    JobRecord,
    Limits,
    Plan,
    WorkerRecord,
    WorkerState,
    expired_jobs,
    idle_expired,
    pick_free,
    pick_loading,
    plan_worker,
    waiting_for_slots,
)
from rbee.hive.request import Request
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import GenerateParams, WorkerInfo, WorkerList

A = "/models/a.gguf"
B = "/models/b.gguf"


def worker(
    wid: str,
    path: str = A,
    state: WorkerState = "idle",
    last_activity: float = 100.0,
    slots: int = 1,
    jobs: int | None = None,
) -> WorkerRecord:
    """A worker record; a busy one runs ``jobs`` jobs (all its slots unless told)."""
    if jobs is None:
        jobs = slots if state == "busy" else 0
    return WorkerRecord(
        worker_id=wid,
        model=path.rsplit("/", 1)[-1],
        model_path=path,
        pid=1000 + len(wid),
        state=state,
        last_activity=last_activity,
        slots=slots,
        job_ids=[f"{wid}-job{i}" for i in range(jobs)],
    )


def job(
    jid: str, finished_at: float = 0.0, path: str = A, backend: str = "", device: str = ""
) -> JobRecord:
    return JobRecord(
        job_id=jid,
        model=path.rsplit("/", 1)[-1],
        model_path=path,
        request=Request(who=b"keeper", rid=1, role="infer"),
        params=GenerateParams(prompt="hi"),
        keep_alive_s=300.0,
        finished_at=finished_at,
        backend=backend,
        device=device,
    )


# --------------------------------------------------------------------------- pick_free


def test_pick_free_prefers_the_most_recently_active() -> None:
    old = worker("old", last_activity=10.0)
    new = worker("new", last_activity=30.0)
    mid = worker("mid", last_activity=20.0)
    assert pick_free([old, new, mid], A) is new
    assert pick_free([mid, old], A) is mid


def test_pick_free_ignores_workers_without_a_free_slot() -> None:
    workers = [
        worker("busy", state="busy", last_activity=90.0),
        worker("loading", state="loading", last_activity=80.0),
        worker("stopping", state="stopping", last_activity=70.0),
        worker("idle", state="idle", last_activity=1.0),
    ]
    assert pick_free(workers, A) is workers[3]
    assert pick_free(workers[:3], A) is None
    full = worker("full", state="busy", slots=4, jobs=4, last_activity=99.0)
    assert full.free_slots == 0 and full.state != "idle"
    assert pick_free([full], A) is None
    assert pick_free([full, workers[3]], A) is workers[3]


def test_pick_free_takes_a_busy_worker_with_a_free_slot() -> None:
    """A worker running jobs still takes one while a slot is free: slots, not workers."""
    busy = worker("busy", state="busy", slots=4, jobs=3)
    assert busy.free_slots == 1
    assert pick_free([busy], A) is busy
    assert plan_worker([busy], A, ROOMY, fits=True) == Plan("reuse", busy)


def test_pick_free_takes_the_most_free_slots_then_the_most_recent() -> None:
    roomy = worker("roomy", state="busy", slots=4, jobs=1, last_activity=1.0)
    tight = worker("tight", state="busy", slots=4, jobs=3, last_activity=99.0)
    assert pick_free([tight, roomy], A) is roomy  # 3 free beat 1, however recent
    twin = worker("twin", state="busy", slots=4, jobs=1, last_activity=50.0)
    assert pick_free([roomy, twin, tight], A) is twin  # a tie in free slots: the most recent
    idle = worker("idle", slots=2, last_activity=200.0)
    assert pick_free([roomy, idle], A) is roomy  # 3 free beat an idle worker's 2


def test_pick_free_ignores_other_models() -> None:
    other = worker("other", path=B, last_activity=99.0)
    mine = worker("mine", path=A, last_activity=1.0)
    assert pick_free([other, mine], A) is mine
    assert pick_free([other, mine], B) is other
    assert pick_free([other], A) is None
    assert pick_free([], A) is None


def test_pick_free_matches_the_path_not_the_name() -> None:
    w = worker("w", path=A)
    w.model = "same-name"
    assert pick_free([w], "same-name") is None
    assert pick_free([w], A) is w


def test_pick_free_honours_a_preferred_worker_with_a_free_slot() -> None:
    old = worker("old", last_activity=10.0)
    new = worker("new", last_activity=30.0)
    assert pick_free([old, new], A, prefer="old") is old
    assert pick_free([old, new], A, prefer="") is new
    assert pick_free([old, new], A, prefer="unknown") is new
    busy = worker("busy", state="busy", last_activity=1.0)
    assert pick_free([old, busy], A, prefer="busy") is old  # preferred but no free slot
    other = worker("other", path=B)
    assert pick_free([old, other], A, prefer="other") is old  # preferred but another model
    # preferred with one free slot beats another worker with more
    one_left = worker("one-left", state="busy", slots=4, jobs=3, last_activity=1.0)
    empty = worker("empty", slots=4, last_activity=99.0)
    assert pick_free([empty, one_left], A, prefer="one-left") is one_left


def test_pick_free_honours_where_the_job_may_run() -> None:
    cpu = worker("cpu", slots=4)
    gpu = worker("gpu", slots=1)
    gpu.backend, gpu.device = "cuda", "0"
    on_gpu = job("j", backend="cuda", device="0")
    assert pick_free([cpu, gpu], A, serves=on_gpu.runs_on) is gpu
    gpu.start_job("other", 300.0)
    assert pick_free([cpu, gpu], A, serves=on_gpu.runs_on) is None  # never the CPU worker


# --------------------------------------------------------------------------- slots


def test_free_slots_by_state() -> None:
    assert worker("loading", state="loading", slots=4).free_slots == 0
    assert worker("stopping", state="stopping", slots=4).free_slots == 0
    assert worker("idle", slots=4).free_slots == 4
    assert worker("busy", state="busy", slots=4, jobs=1).free_slots == 3
    assert worker("full", state="busy", slots=4).free_slots == 0


def test_jobs_take_and_free_slots_and_the_last_one_starts_the_keep_alive() -> None:
    w = worker("w", slots=3)
    w.became_idle(now=0.0, keep_alive_s=60.0)
    w.start_job("j1", keep_alive_s=30.0)
    assert (w.state, w.job_ids, w.free_slots) == ("busy", ["j1"], 2)
    assert w.idle_deadline == math.inf  # its keep-alive runs only while it is idle
    assert idle_expired([w], now=1e9) == []
    w.start_job("j2", keep_alive_s=-1.0)
    w.start_job("j3", keep_alive_s=10.0)  # the latest request's keep-alive wins
    assert w.free_slots == 0 and pick_free([w], A) is None
    w.end_job("j1", now=100.0)
    assert (w.state, w.job_ids, w.free_slots, w.jobs_served) == ("busy", ["j2", "j3"], 1, 1)
    assert idle_expired([w], now=1e9) == []  # one job ended, two still run: not idle
    w.end_job("j3", now=100.0)
    w.end_job("unknown", now=100.0)  # harmless, counts nothing
    assert (w.state, w.jobs_served) == ("busy", 2)
    w.end_job("j2", now=200.0)
    assert (w.state, w.job_ids, w.free_slots, w.jobs_served) == ("idle", [], 3, 3)
    assert (w.keep_alive_s, w.idle_deadline) == (10.0, 210.0)
    assert idle_expired([w], now=210.0) == [w]


def test_a_stopping_worker_stays_stopping_as_its_jobs_end() -> None:
    w = worker("w", state="busy", slots=2, jobs=2)
    w.state = "stopping"
    assert w.free_slots == 0
    w.end_job("w-job0", now=1.0)
    w.end_job("w-job1", now=1.0)
    assert (w.state, w.job_ids, w.jobs_served, w.free_slots) == ("stopping", [], 2, 0)
    assert idle_expired([w], now=1e9) == []


def test_waiting_for_slots_fills_free_slots_in_order() -> None:
    a4 = worker("a4", state="busy", slots=4, jobs=2)  # 2 free
    a1 = worker("a1")  # 1 free
    b = worker("b", path=B, slots=4)
    jobs = [job(f"j{i}") for i in range(5)]
    assert waiting_for_slots(jobs, [a4, a1, b]) == jobs[3:]  # 3 free slots for A: 3 start
    assert waiting_for_slots(jobs, []) == jobs
    on_b = job("jb", path=B)
    assert waiting_for_slots([*jobs, on_b], [a4, b]) == jobs[2:]


def test_waiting_for_slots_counts_loading_slots_only_when_asked() -> None:
    loading = worker("loading", state="loading", slots=4)
    jobs = [job(f"j{i}") for i in range(6)]
    assert waiting_for_slots(jobs, [loading]) == jobs  # no slot is free now
    assert waiting_for_slots(jobs, [loading], loading=True) == jobs[4:]  # 4 are coming
    stopping = worker("stopping", state="stopping", slots=4)
    assert waiting_for_slots(jobs, [stopping], loading=True) == jobs


def test_waiting_for_slots_honours_where_each_job_may_run() -> None:
    gpu = worker("gpu", slots=2)
    gpu.backend, gpu.device = "cuda", "0"
    cpu = worker("cpu", slots=2)
    on_gpu = [job(f"g{i}", backend="cuda", device="0") for i in range(3)]
    assert waiting_for_slots(on_gpu, [cpu, gpu]) == on_gpu[2:]


# --------------------------------------------------------------------------- pick_loading


def test_pick_loading() -> None:
    idle = worker("idle", state="idle")
    loading_b = worker("loading-b", path=B, state="loading")
    loading_a = worker("loading-a", path=A, state="loading")
    assert pick_loading([idle, loading_b, loading_a], A) is loading_a
    assert pick_loading([idle, loading_b, loading_a], B) is loading_b
    assert pick_loading([idle, loading_b], A) is None
    assert pick_loading([worker("busy", state="busy")], A) is None
    assert pick_loading([], A) is None


def test_new_worker_record_starts_loading() -> None:
    w = WorkerRecord(worker_id="w-1", model="m", model_path=A, pid=5, slots=4)
    assert w.state == "loading" and w.free_slots == 0
    assert pick_loading([w], A) is w
    assert pick_free([w], A) is None


# --------------------------------------------------------------------------- expired_jobs


def test_unfinished_jobs_never_expire() -> None:
    jobs = [job(f"run-{i}") for i in range(MAX_FINISHED_JOBS + 10)]
    assert not any(j.finished for j in jobs)
    assert expired_jobs(jobs, now=1e12) == []


def test_old_finished_jobs_expire() -> None:
    now = 10_000.0
    jobs = [
        job("fresh", finished_at=now - 1.0),
        job("edge", finished_at=now - JOB_RETENTION_S),  # exactly at the limit: kept
        job("old", finished_at=now - JOB_RETENTION_S - 0.5),
        job("ancient", finished_at=1.0),
        job("running"),
    ]
    assert jobs[0].finished and not jobs[4].finished
    assert expired_jobs(jobs, now) == ["ancient", "old"]


def test_surplus_beyond_max_finished_jobs_expires_oldest_first() -> None:
    now = 5_000.0
    surplus = 3
    finished = [
        job(f"j{i:04d}", finished_at=now - 100 + i * 0.01)
        for i in range(MAX_FINISHED_JOBS + surplus)
    ]
    running = [job("running-1"), job("running-2")]
    # the order of the input must not matter
    jobs = [*reversed(finished[::2]), *running, *finished[1::2]]
    assert expired_jobs(jobs, now) == ["j0000", "j0001", "j0002"]


def test_exactly_max_finished_jobs_is_not_a_surplus() -> None:
    now = 5_000.0
    jobs = [job(f"j{i}", finished_at=now - i) for i in range(MAX_FINISHED_JOBS)]
    assert expired_jobs(jobs, now) == []


def test_old_and_surplus_are_combined_without_duplicates() -> None:
    now = 100_000.0
    old = [job(f"old{i}", finished_at=1.0 + i) for i in range(5)]
    recent = [
        job(f"new{i:04d}", finished_at=now - 10 + i * 0.001) for i in range(MAX_FINISHED_JOBS)
    ]
    expired = expired_jobs([*recent, *old], now)
    # the 5 old ones are both too old and the surplus; each is named once, sorted
    assert expired == [f"old{i}" for i in range(5)]


def test_surplus_can_remove_recent_jobs_too() -> None:
    now = 100_000.0
    jobs = [
        job(f"n{i:04d}", finished_at=now - 1 + i * 0.0001) for i in range(MAX_FINISHED_JOBS + 1)
    ]
    assert expired_jobs(jobs, now) == ["n0000"]


# --------------------------------------------------------------------------- WorkerRecord.info


def test_worker_record_info_is_a_valid_worker_info() -> None:
    w = WorkerRecord(worker_id="w-abc", model="tiny", model_path=A, pid=4321, slots=4)
    w.start_job("job-7", 300.0)
    w.start_job("job-8", 300.0)
    w.jobs_served, w.keep_alive_s = 5, -1.0
    info = w.info(rss_bytes=2048)
    assert isinstance(info, WorkerInfo)
    assert info == WorkerInfo(
        worker_id="w-abc",
        model="tiny",
        backend="cpu",
        device="cpu",
        pid=4321,
        state="busy",
        last_activity=w.last_activity,
        job_id="job-7",
        rss_bytes=2048,
        jobs_served=5,
        keep_alive_s=-1.0,
        slots=4,
        slots_busy=2,
    )
    assert abs(info.last_activity - time.time()) < 60  # wall clock, not monotonic
    # and it goes over the wire intact
    back = decode(encode(WorkerList(workers=[info]))).frame
    assert isinstance(back, WorkerList)
    assert back.workers == [info]


def test_worker_record_info_defaults() -> None:
    info = WorkerRecord(worker_id="w", model="m", model_path=A, pid=0).info()
    assert info.rss_bytes == 0
    assert info.job_id == ""
    assert info.state == "loading"
    assert (info.slots, info.slots_busy) == (1, 0)


def test_worker_info_shows_only_a_job_the_caller_may_see() -> None:
    w = worker("w", slots=3)
    for job_id in ("theirs-1", "mine", "theirs-2"):
        w.start_job(job_id, 300.0)
    assert w.info().job_id == "theirs-1"  # an admin: the oldest job
    assert w.info(job_shown=lambda j: j == "mine").job_id == "mine"
    hidden = w.info(job_shown=lambda j: False)
    assert (hidden.job_id, hidden.slots_busy, hidden.slots) == ("", 3, 3)  # counts, no ids


def test_finished_property() -> None:
    assert job("a").finished is False
    assert job("b", finished_at=0.001).finished is True


# --------------------------------------------------------------------------- keep-alive


def test_became_idle() -> None:
    w = worker("w")
    w.start_job("job-1", keep_alive_s=30.0)
    before = time.time()
    w.end_job("job-1", now=1000.0)
    assert (w.state, w.job_ids, w.keep_alive_s, w.idle_deadline) == ("idle", [], 30.0, 1030.0)
    assert w.last_activity >= before  # wall clock, shown to keepers
    w.became_idle(now=1000.0, keep_alive_s=-1.0)
    assert w.idle_deadline == math.inf
    w.became_idle(now=1000.0, keep_alive_s=0.0)
    assert w.idle_deadline == 1000.0


def test_idle_expired() -> None:
    due = worker("due")
    due.became_idle(now=100.0, keep_alive_s=10.0)
    later = worker("later")
    later.became_idle(now=100.0, keep_alive_s=60.0)
    forever = worker("forever")
    forever.became_idle(now=0.0, keep_alive_s=-1.0)
    at_once = worker("at-once")
    at_once.became_idle(now=110.0, keep_alive_s=0.0)
    busy = worker("busy")
    busy.became_idle(now=0.0, keep_alive_s=1.0)
    busy.state = "busy"
    loading = worker("loading", state="loading")
    loading.idle_deadline = 0.0
    workers = [due, later, forever, at_once, busy, loading]
    assert idle_expired(workers, now=109.9) == []
    assert idle_expired(workers, now=110.0) == [due, at_once]
    assert idle_expired(workers, now=1e9) == [due, later, at_once]


def test_new_worker_never_expires_before_its_first_job() -> None:
    w = worker("fresh", state="idle")
    assert w.idle_deadline == math.inf
    assert idle_expired([w], now=1e12) == []


# --------------------------------------------------------------------------- plan_worker

ROOMY = Limits(max_workers=4, max_workers_per_model=1, max_queue=16)


def test_plan_reuses_an_idle_worker() -> None:
    idle = worker("idle")
    assert plan_worker([idle], A, ROOMY, fits=False) == Plan("reuse", idle)


def test_plan_waits_for_a_loading_worker() -> None:
    loading = worker("loading", state="loading")
    assert plan_worker([loading], A, ROOMY, fits=True) == Plan("wait", loading)


def test_plan_spawns_when_there_is_room() -> None:
    assert plan_worker([], A, ROOMY, fits=True) == Plan("spawn")
    others = [worker("b1", path=B, state="busy")]
    assert plan_worker(others, A, ROOMY, fits=True) == Plan("spawn")


def test_plan_refuses_what_does_not_fit() -> None:
    assert plan_worker([], A, ROOMY, fits=False) == Plan("busy")


def test_plan_reuses_a_worker_with_a_free_slot_before_spawning_another() -> None:
    busy = worker("busy", state="busy", slots=4, jobs=3)
    roomy = Limits(max_workers=4, max_workers_per_model=2)
    assert plan_worker([busy], A, roomy, fits=True) == Plan("reuse", busy)
    busy.start_job("fourth", 300.0)
    assert plan_worker([busy], A, roomy, fits=True) == Plan("spawn")  # no slot free: a 2nd
    assert plan_worker([busy], A, roomy, fits=False) == Plan("queue", busy)  # memory says no
    one = Limits(max_workers=4, max_workers_per_model=1)
    assert plan_worker([busy], A, one, fits=True) == Plan("queue", busy)  # the limit says no
    full = Limits(max_workers=1, max_workers_per_model=2)
    assert plan_worker([busy], A, full, fits=True) == Plan("queue", busy)


def test_plan_never_evicts_a_worker_that_runs_a_job() -> None:
    limits = Limits(max_workers=2, max_workers_per_model=1)
    b_busy = worker("b-busy", path=B, state="busy", slots=4, jobs=1, last_activity=1.0)
    b_idle = worker("b-idle", path=B, slots=4, last_activity=50.0)
    assert plan_worker([b_busy, b_idle], A, limits, fits=True) == Plan("spawn", evict=b_idle)
    b_idle.start_job("j", 300.0)
    assert plan_worker([b_busy, b_idle], A, limits, fits=True) == Plan("busy")


def test_plan_queues_on_the_same_model_at_its_limit() -> None:
    busy_old = worker("busy-old", state="busy", last_activity=1.0)
    busy_new = worker("busy-new", state="busy", last_activity=9.0)
    limits = Limits(max_workers=4, max_workers_per_model=2)
    plan = plan_worker([busy_new, busy_old], A, limits, fits=True)
    assert plan == Plan("queue", busy_old)
    one = Limits(max_workers=4, max_workers_per_model=1)
    assert plan_worker([busy_new], A, one, fits=True) == Plan("queue", busy_new)
    assert plan_worker([busy_new], A, limits, fits=True) == Plan("spawn")  # room for a 2nd
    assert plan_worker([busy_new], A, limits, fits=False) == Plan("queue", busy_new)


def test_plan_evicts_the_least_recently_used_idle_worker_of_another_model() -> None:
    limits = Limits(max_workers=3, max_workers_per_model=1)
    b_recent = worker("b-recent", path=B, last_activity=50.0)
    b_stale = worker("b-stale", path=B, last_activity=5.0)
    c_busy = worker("c-busy", path="/models/c.gguf", state="busy", last_activity=1.0)
    plan = plan_worker([b_recent, b_stale, c_busy], A, limits, fits=True)
    assert plan == Plan("spawn", evict=b_stale)


def test_plan_is_busy_when_full_of_busy_workers_of_other_models() -> None:
    limits = Limits(max_workers=2, max_workers_per_model=1)
    workers = [worker("b", path=B, state="busy"), worker("c", path=B, state="loading")]
    assert plan_worker(workers, A, limits, fits=True) == Plan("busy")


def test_plan_does_not_count_stopping_workers() -> None:
    limits = Limits(max_workers=1, max_workers_per_model=1)
    stopping_other = worker("s1", path=B, state="stopping")
    stopping_same = worker("s2", path=A, state="stopping")
    assert plan_worker([stopping_other, stopping_same], A, limits, fits=True) == Plan("spawn")
    assert plan_worker([stopping_same], A, limits, fits=False) == Plan("busy")


def test_finished_jobs_keep_a_bounded_number_of_bytes_oldest_dropped_first() -> None:
    now = 5_000.0
    big = b"x" * (MAX_FINISHED_BYTES // 4 + 1)  # four of these are over the budget
    jobs = [job(f"j{i}", finished_at=now - 10 + i) for i in range(6)]
    for j in jobs:
        j.keep(big)
    running = job("running")
    running.keep(big * 8)  # a running job's frames are never forgotten
    assert jobs[0].frame_bytes == len(big)
    assert expired_jobs([running, *jobs], now) == ["j0", "j1", "j2"]
