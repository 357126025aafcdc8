"""The hive's in-memory picture of its workers and jobs, and the pure decisions made from it.

Nothing here touches a socket or a process: the server feeds events in and acts on the answers,
so the rules (which worker to reuse, when to spawn, queue or refuse, when a job's buffer may be
forgotten, when an idle worker unloads) are tested directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rbee.hive.request import Request
from rbee.protocol.messages import HIVE_KEEP_ALIVE_S, GenerateParams, WorkerInfo

JOB_RETENTION_S = 300.0
MAX_FINISHED_JOBS = 256
MAX_FINISHED_BYTES = 64 * 1024 * 1024  # the stream frames finished jobs keep, in all

Serves = Callable[["WorkerRecord"], bool]  # whether a worker runs where a request wants
WorkerState = Literal["loading", "idle", "busy", "stopping"]
Action = Literal["reuse", "wait", "spawn", "queue", "busy"]


def _anywhere(worker: WorkerRecord) -> bool:
    return True


@dataclass(eq=False)
class WorkerRecord:
    """One worker process and what the hive knows of it."""

    worker_id: str
    model: str
    model_path: str
    pid: int
    backend: str = "cpu"
    device: str = "cpu"
    state: WorkerState = "loading"
    job_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.time)
    registered: bool = False
    loaded_fraction: float = 0.0
    load_s: float = 0.0
    waiters: list[Request] = field(default_factory=list)  # EnsureWorker requests it will answer
    stop_deadline: float = 0.0
    jobs_served: int = 0
    keep_alive_s: float = HIVE_KEEP_ALIVE_S
    idle_deadline: float = math.inf
    vram_bytes: int = 0  # measured by the worker once loaded (NVML, its own process)
    estimate_bytes: int = 0  # what the hive expected it to need (rbee.hive.placement)
    gpu_layers: int = 0

    def info(
        self, rss_bytes: int = 0, vram_bytes: int | None = None, job_shown: bool = True
    ) -> WorkerInfo:
        """The wire form shown to keepers (``job_shown``: whether they may see its job's id)."""
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            backend=self.backend,
            device=self.device,
            pid=self.pid,
            state=self.state,
            last_activity=self.last_activity,
            job_id=self.job_id if job_shown else "",
            rss_bytes=rss_bytes,
            jobs_served=self.jobs_served,
            keep_alive_s=self.keep_alive_s,
            vram_bytes=self.vram_bytes if vram_bytes is None else vram_bytes,
            estimate_bytes=self.estimate_bytes,
        )

    def became_idle(self, now: float, keep_alive_s: float) -> None:
        """A job ended: the worker is idle and unloads after ``keep_alive_s`` (-1: never)."""
        self.state, self.job_id = "idle", ""
        self.last_activity = time.time()
        self.keep_alive_s = keep_alive_s
        self.idle_deadline = math.inf if keep_alive_s < 0 else now + keep_alive_s


@dataclass(eq=False)
class JobRecord:
    """One job: who asked, where it runs, and every stream frame it produced so far."""

    job_id: str
    model: str
    model_path: str
    request: Request  # the StartJob: answered with JobAccepted when the job starts
    params: GenerateParams | None  # until it is handed to a worker (a prompt can be megabytes)
    keep_alive_s: float
    canceled_by: str = ""  # who canceled it, when that was not its own keeper (an admin)
    preferred_worker: str = ""
    backend: str = ""  # where the job may run ("": anywhere), from its preferred worker
    device: str = ""
    worker_id: str = ""
    queued_at: float = field(default_factory=time.monotonic)
    dispatched: bool = False
    frames: list[bytes] = field(default_factory=list)
    frame_bytes: int = 0
    finished_at: float = 0.0
    told_position: int = -1
    told_at: float = 0.0

    @property
    def owner(self) -> str:
        """The CURVE key that started the job ("" on a development-mode hive)."""
        return self.request.key

    def keep(self, frame: bytes) -> None:
        """Keep one stream frame for FetchFrames (its bytes are counted)."""
        self.frames.append(frame)
        self.frame_bytes += len(frame)

    @property
    def finished(self) -> bool:
        """Whether the terminal frame is in."""
        return self.finished_at > 0

    def runs_on(self, worker: WorkerRecord) -> bool:
        """Whether the job may run on ``worker``: anywhere, or where its preferred worker runs
        (a job sent to a GPU worker never lands on a CPU worker holding the same model)."""
        return not self.backend or (worker.backend, worker.device) == (self.backend, self.device)


@dataclass(frozen=True)
class Limits:
    """How many workers a hive may run, and how long a queue it keeps."""

    max_workers: int = 4
    max_workers_per_model: int = 1
    max_queue: int = 16


@dataclass(frozen=True)
class Plan:
    """What EnsureWorker should do: reuse, wait, spawn (maybe after evicting), queue, or refuse."""

    action: Action
    worker: WorkerRecord | None = None
    evict: WorkerRecord | None = None


def pick_idle(
    workers: list[WorkerRecord], model_path: str, prefer: str = "", serves: Serves = _anywhere
) -> WorkerRecord | None:
    """The idle worker holding ``model_path`` where ``serves`` says: ``prefer`` if idle, else
    the most recently used one (its caches are warm)."""
    idle = [w for w in workers if w.state == "idle" and w.model_path == model_path and serves(w)]
    preferred = [w for w in idle if w.worker_id == prefer]
    return preferred[0] if preferred else max(idle, key=lambda w: w.last_activity, default=None)


def pick_loading(
    workers: list[WorkerRecord], model_path: str, serves: Serves = _anywhere
) -> WorkerRecord | None:
    """A worker already loading ``model_path``: a second request waits for it, not a new one."""
    return next(
        (w for w in workers if w.state == "loading" and w.model_path == model_path and serves(w)),
        None,
    )


def plan_worker(
    workers: list[WorkerRecord],
    model_path: str,
    limits: Limits,
    fits: bool,
    serves: Serves = _anywhere,
) -> Plan:
    """Decide how to get a worker for ``model_path`` on the device ``serves`` accepts.

    ``fits``: whether one more worker of this model fits in free memory. Order: an idle worker;
    one already loading; a new one while under both limits and it fits; a new one in place of
    the least recently used idle worker of another model (or device); else a busy worker of this
    model (the job queues); else busy.
    """
    idle = pick_idle(workers, model_path, serves=serves)
    if idle is not None:
        return Plan("reuse", idle)
    loading = pick_loading(workers, model_path, serves)
    if loading is not None:
        return Plan("wait", loading)
    live = [w for w in workers if w.state != "stopping"]
    same = [w for w in live if w.model_path == model_path and serves(w)]
    if len(same) < limits.max_workers_per_model and fits:
        if len(live) < limits.max_workers:
            return Plan("spawn")
        others_idle = [w for w in live if w.state == "idle" and w not in same]
        if others_idle:
            return Plan("spawn", evict=min(others_idle, key=lambda w: w.last_activity))
    if same:
        return Plan("queue", min(same, key=lambda w: w.last_activity))
    return Plan("busy")


def expired_jobs(jobs: list[JobRecord], now: float) -> list[str]:
    """Finished jobs whose frames may be forgotten: too old, or beyond the newest few, or
    (oldest first) beyond MAX_FINISHED_BYTES of frames in all."""
    finished = sorted((j for j in jobs if j.finished), key=lambda j: j.finished_at)
    old = {j.job_id for j in finished if now - j.finished_at > JOB_RETENTION_S}
    surplus = {j.job_id for j in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]}
    kept = sum(j.frame_bytes for j in finished)
    for j in finished:
        if kept <= MAX_FINISHED_BYTES:
            break
        surplus.add(j.job_id)
        kept -= j.frame_bytes
    return sorted(old | surplus)


def idle_expired(workers: list[WorkerRecord], now: float) -> list[WorkerRecord]:
    """Idle workers whose keep-alive ran out (never one that is loading or busy)."""
    return [w for w in workers if w.state == "idle" and now >= w.idle_deadline]
