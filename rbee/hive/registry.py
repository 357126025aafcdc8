"""The hive's in-memory picture of its workers and jobs, and the pure decisions made from it.

Nothing here touches a socket or a process: the server feeds events in and acts on the answers,
so the rules (which worker to reuse, when a job's buffer may be forgotten) are tested directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rbee.protocol.messages import GenerateParams, WorkerInfo

JOB_RETENTION_S = 300.0
MAX_FINISHED_JOBS = 256


@dataclass(eq=False)
class WorkerRecord:
    """One worker process and what the hive knows of it."""

    worker_id: str
    model: str
    model_path: str
    pid: int
    backend: str = "cpu"
    device: str = "cpu"
    state: str = "loading"
    job_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.time)
    registered: bool = False
    loaded_fraction: float = 0.0
    load_s: float = 0.0
    waiters: list[tuple[bytes, int]] = field(default_factory=list)
    stop_deadline: float = 0.0

    def info(self, rss_bytes: int = 0) -> WorkerInfo:
        """The wire form shown to keepers."""
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.model,
            backend=self.backend,
            device=self.device,
            pid=self.pid,
            state=self.state,
            last_activity=self.last_activity,
            job_id=self.job_id,
            rss_bytes=rss_bytes,
        )


@dataclass(eq=False)
class JobRecord:
    """One job: who asked, where it runs, and every stream frame it produced so far."""

    job_id: str
    worker_id: str
    keeper: bytes
    params: GenerateParams
    dispatched: bool = False
    subscribe_deadline: float = 0.0
    frames: list[bytes] = field(default_factory=list)
    finished_at: float = 0.0

    @property
    def finished(self) -> bool:
        """Whether the terminal frame is in."""
        return self.finished_at > 0


def pick_idle(workers: list[WorkerRecord], model_path: str) -> WorkerRecord | None:
    """The idle worker holding ``model_path`` that was used most recently (its caches are warm)."""
    idle = [w for w in workers if w.state == "idle" and w.model_path == model_path]
    return max(idle, key=lambda w: w.last_activity, default=None)


def pick_loading(workers: list[WorkerRecord], model_path: str) -> WorkerRecord | None:
    """A worker already loading ``model_path``: a second request waits for it, not a new one."""
    return next((w for w in workers if w.state == "loading" and w.model_path == model_path), None)


def expired_jobs(jobs: list[JobRecord], now: float) -> list[str]:
    """Finished jobs whose frames may be forgotten: too old, or beyond the newest few."""
    finished = sorted((j for j in jobs if j.finished), key=lambda j: j.finished_at)
    old = {j.job_id for j in finished if now - j.finished_at > JOB_RETENTION_S}
    surplus = {j.job_id for j in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]}
    return sorted(old | surplus)
