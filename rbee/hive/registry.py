"""The hive's in-memory picture of its workers and jobs, and the pure decisions made from it.

A worker has ``slots``: the jobs it decodes together. The hive schedules slots, not workers: a
job goes to a free slot of a worker holding its model, a new worker for the model comes only
when no slot is free and the limits allow, and a job waits in the queue while no slot is free.

Nothing here touches a socket or a process: the server feeds events in and acts on the answers,
so the rules (which worker takes a job, when to spawn, queue or refuse, when a job's buffer may
be forgotten, when an idle worker unloads) are tested directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from rbee.gpu import lent_label, worker_label
from rbee.hive.request import Request
from rbee.protocol.messages import HIVE_KEEP_ALIVE_S, GenerateParams, WorkerInfo

if TYPE_CHECKING:
    from rbee.hive.borrow import Tunnel

JOB_RETENTION_S = 300.0
MAX_FINISHED_JOBS = 256
MAX_FINISHED_BYTES = 64 * 1024 * 1024  # the stream frames finished jobs keep, in all

Serves = Callable[["WorkerRecord"], bool]  # whether a worker runs where a request wants
WorkerState = Literal["loading", "idle", "busy", "stopping"]
Action = Literal["reuse", "wait", "spawn", "queue", "busy"]


def _anywhere(worker: WorkerRecord) -> bool:
    return True


def holds_context(worker: WorkerRecord, n_ctx: int) -> bool:
    """Whether each slot of ``worker`` holds ``n_ctx`` tokens of context: a request that asked
    for more (Ollama's ``options.num_ctx``) would fail or be cut short there, so it gets a
    worker loaded with that context instead. 0 on either side: nothing asked, or not known."""
    return n_ctx <= 0 or worker.n_ctx <= 0 or worker.n_ctx >= n_ctx


@dataclass(eq=False)
class WorkerRecord:
    """One worker process and what the hive knows of it."""

    worker_id: str
    model: str
    model_path: str
    pid: int
    backend: str = "cpu"
    device: str = "cpu"
    device_uuid: str = ""  # the CUDA GPUs it was given (CUDA_VISIBLE_DEVICES)
    state: WorkerState = "loading"  # idle: runs no job; busy: runs at least one
    slots: int = 1  # jobs it runs at once: as asked at spawn, then as its WorkerReady says
    n_ctx: int = 0  # tokens of context per slot: as asked at spawn, then as WorkerReady says
    job_ids: list[str] = field(default_factory=list)  # the jobs it runs, oldest first
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
    tokens_generated: int = 0  # by every job it ran to the end (`rbee top`'s tokens/s)
    keep_alive_s: float = HIVE_KEEP_ALIVE_S
    idle_deadline: float = math.inf
    vram_bytes: int = 0  # measured by the worker once loaded (NVML, its own process)
    estimate_bytes: int = 0  # what the hive expected it to need (rbee.hive.placement)
    gpu_layers: int = 0  # as llama.cpp reported once loaded
    n_layers: int = 0  # of how many (llama.cpp's offloadable layers)
    layers: tuple[int, ...] = ()  # the planned layers per GPU, when several
    next_keep_alive_s: float = HIVE_KEEP_ALIVE_S  # the latest job's: applies once it is idle
    lenders: tuple[str, ...] = ()  # peer hives holding ``layers`` of its layers (lent memory)
    tunnels: list[Tunnel] = field(default_factory=list)  # its RPC links to them

    @property
    def lender_failure(self) -> str:
        """Why a link to a lender broke ("" while none did): what ended the worker."""
        return next((f"{t.lender_name}: {t.reason}" for t in self.tunnels if t.failed), "")

    @property
    def partial(self) -> bool:
        """Whether some of its layers run on the CPU though it is a GPU worker (known once it
        loaded): no answer to a request that asked for every layer on a GPU."""
        return 0 < self.gpu_layers < self.n_layers

    @property
    def where(self) -> str:
        """Where its layers are: ``cpu``, ``cuda:0 31/31``, ``cpu+cuda:0 9+22/31``, with lent
        memory ``cpu+beta 11+20/31`` …"""
        if self.lenders:
            return lent_label(self.lenders, self.layers, self.n_layers)
        return worker_label(self.backend, self.device, self.gpu_layers, self.n_layers, self.layers)

    @property
    def free_slots(self) -> int:
        """How many more jobs it may take now (none while it loads or stops)."""
        if self.state not in ("idle", "busy"):
            return 0
        return max(0, self.slots - len(self.job_ids))

    def info(
        self,
        rss_bytes: int = 0,
        vram_bytes: int | None = None,
        job_shown: Callable[[str], bool] = lambda job_id: True,
    ) -> WorkerInfo:
        """The wire form shown to keepers: ``job_id`` is the oldest of its jobs that
        ``job_shown`` lets them see ("" when none)."""
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            backend=self.backend,
            device=self.device,
            pid=self.pid,
            state=self.state,
            last_activity=self.last_activity,
            job_id=next((j for j in self.job_ids if job_shown(j)), ""),
            rss_bytes=rss_bytes,
            jobs_served=self.jobs_served,
            tokens_generated=self.tokens_generated,
            keep_alive_s=self.keep_alive_s,
            vram_bytes=self.vram_bytes if vram_bytes is None else vram_bytes,
            estimate_bytes=self.estimate_bytes,
            slots=self.slots,
            slots_busy=len(self.job_ids),
            gpu_layers=self.gpu_layers,
            n_layers=self.n_layers,
            layers=list(self.layers),
            lenders=list(self.lenders),
            n_ctx=self.n_ctx,
        )

    def start_job(self, job_id: str, keep_alive_s: float) -> None:
        """A job took one of its free slots; ``keep_alive_s`` (the job's) applies once the
        worker is idle again, unless a later job brings its own (the latest request wins, as
        in Ollama)."""
        self.job_ids.append(job_id)
        self.state = "busy"
        self.idle_deadline = math.inf
        self.next_keep_alive_s = keep_alive_s
        self.last_activity = time.time()

    def end_job(self, job_id: str, now: float) -> None:
        """A job it ran ended (its slot is free); with its last job it becomes idle and its
        keep-alive starts. A stopping worker stays stopping."""
        if job_id not in self.job_ids:
            return
        self.job_ids.remove(job_id)
        self.jobs_served += 1
        self.last_activity = time.time()
        if self.state == "busy" and not self.job_ids:
            self.became_idle(now, self.next_keep_alive_s)

    def became_idle(self, now: float, keep_alive_s: float) -> None:
        """It runs no job (it just loaded, or its last job ended): it unloads after
        ``keep_alive_s`` (-1: never)."""
        self.state = "idle"
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
    n_ctx: int = 0  # the context per slot it needs (0: any worker of its model will do)
    worker_id: str = ""
    queued_at: float = field(default_factory=time.monotonic)
    dispatched: bool = False
    frames: list[bytes] = field(default_factory=list)
    frame_bytes: int = 0
    tokens: int = 0  # generated so far (a Token frame may carry several)
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
        (a job sent to a GPU worker never lands on a CPU worker holding the same model), and
        only where a slot holds the context it needs."""
        where = not self.backend or (worker.backend, worker.device) == (self.backend, self.device)
        return where and holds_context(worker, self.n_ctx)


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


def pick_free(
    workers: list[WorkerRecord], model_path: str, prefer: str = "", serves: Serves = _anywhere
) -> WorkerRecord | None:
    """The worker holding ``model_path``, where ``serves`` says, that takes a job now:
    ``prefer`` if it has a free slot, else the one with the most free slots (the most recently
    used on a tie: its caches are warm)."""
    free = [w for w in workers if w.free_slots and w.model_path == model_path and serves(w)]
    preferred = [w for w in free if w.worker_id == prefer]
    if preferred:
        return preferred[0]
    return max(free, key=lambda w: (w.free_slots, w.last_activity), default=None)


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

    ``fits``: whether one more worker of this model fits in free memory. Order: a worker with a
    free slot; one already loading; a new one while under both limits and it fits; a new one in
    place of the least recently used idle worker of another model (or device); else a worker of
    this model whose slots are all busy (the job queues); else busy.
    """
    free = pick_free(workers, model_path, serves=serves)
    if free is not None:
        return Plan("reuse", free)
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


def waiting_for_slots(
    jobs: list[JobRecord], workers: list[WorkerRecord], loading: bool = False
) -> list[JobRecord]:
    """The jobs, oldest first, that no free slot covers: each job in turn takes a free slot of a
    worker holding its model where it may run. With ``loading``, a loading worker's slots count
    as free too (they soon are)."""
    left = {w: w.slots if loading and w.state == "loading" else w.free_slots for w in workers}
    waiting = []
    for job in jobs:
        worker = next(
            (w for w in workers if left[w] and w.model_path == job.model_path and job.runs_on(w)),
            None,
        )
        if worker is None:
            waiting.append(job)
        else:
            left[worker] -= 1
    return waiting


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
    """Idle workers whose keep-alive ran out (never one that is loading or runs a job)."""
    return [w for w in workers if w.state == "idle" and now >= w.idle_deadline]
