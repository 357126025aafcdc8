"""The hive's event loop: one thread owns every socket and carries out every decision.

Sockets:

* ``front``  ROUTER, the only request socket on the network: keepers' requests.
* ``back``   ROUTER on loopback: this hive's workers (progress, Ready, heartbeats).
* ``xsub``   XSUB on loopback: workers' token streams; it subscribes to everything, so the
  worker → hive hop never filters or drops.
* ``xpub``   XPUB on the network: keepers' SUB sockets. It runs verbose, so the loop sees each
  subscription and starts a job only once its keeper is listening (no lost first tokens).

Every stream frame passing through is validated and kept per job, so a keeper that missed frames
(slow reader, high-water mark) gets them again with FetchFrames. Jobs that find no idle worker
wait in a bounded FIFO queue. SIGTERM drains: no new work, running jobs get a grace period, then
workers are asked, told (SIGTERM) and finally forced (SIGKILL) to stop.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import zmq
from zmq.auth.thread import ThreadAuthenticator

from rbee import __version__, log
from rbee.catalog import Catalog, ModelEntry
from rbee.errors import (
    AccessDenied,
    AllSlotsBusy,
    Canceled,
    HiveDraining,
    InsufficientRam,
    InternalError,
    InvalidRequest,
    JobNotFound,
    ModelNotFound,
    RbeeError,
    WorkerCrashed,
    WorkerNotFound,
)
from rbee.hive.pool import Event, WorkerPool
from rbee.hive.pulls import Finished, Pulls, describe_progress
from rbee.hive.registry import (
    JobRecord,
    Limits,
    WorkerRecord,
    expired_jobs,
    idle_expired,
    pick_idle,
    plan_worker,
)
from rbee.hub.download import DownloadManager
from rbee.hub.refs import is_hub_reference, parse_reference
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    KEEP_ALIVE_DEFAULT,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    CancelJob,
    Done,
    EnsureWorker,
    FetchFrames,
    Frame,
    FramesReply,
    Hello,
    HelloReply,
    HiveStatus,
    JobAccepted,
    ListWorkers,
    ModelInfo,
    ModelPulled,
    Progress,
    PullModel,
    RunJob,
    StartJob,
    Status,
    StopWorker,
    StreamError,
    Token,
    WorkerAssigned,
    WorkerInfo,
    WorkerList,
)
from rbee.transport.keys import AuthorizedKeys, fingerprint, load_or_create
from rbee.transport.sockets import (
    LOCAL_HWM,
    STREAM_HWM,
    RouterServer,
    bind_endpoint,
    curve_server,
    new_socket,
)

POLL_INTERVAL_S = 0.1
SUBSCRIBE_TIMEOUT_S = 4.0  # under the keeper's 5 s wait for a reply
PROGRESS_EVERY_S = 1.0  # a waiting keeper hears from the hive at least this often
QUEUE_WAIT_S = 300.0
RETRY_AFTER_S = 2.0
DRAIN_GRACE_S = 10.0
MAX_FRAMES_PER_REPLY = 8192
DRAIN_BATCH = 1000
DEFAULT_CTX_TOKENS = 4096
MEMORY_MARGIN_BYTES = 256 * 1024 * 1024
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

logger = log.get(__name__)


@dataclass(frozen=True)
class HiveConfig:
    """How a hive runs: where it listens and what it may do."""

    host: str
    port: int
    stream_port: int
    data_dir: Path
    node: str = ""
    ephemeral: bool = False
    limits: Limits = field(default_factory=Limits)
    keep_alive_s: float = 300.0
    drain_grace_s: float = DRAIN_GRACE_S
    secure: bool = False  # CURVE even on loopback (always on for any other address)

    @property
    def loopback_only(self) -> bool:
        """Development mode: nothing but this machine can reach the hive."""
        return self.host in LOOPBACK_HOSTS


ADMIN_FRAMES = (PullModel, StopWorker)


class _KeyCheck:
    """The ZAP callback: a CURVE client gets in only with an authorized key (runs on the
    authenticator's thread, so it has its own view of the file)."""

    def __init__(self, data_dir: Path) -> None:
        self.keys = AuthorizedKeys(data_dir)

    def callback(self, domain: str, key: bytes) -> bool:
        return bool(self.keys.role(key.decode("ascii", "replace")))


class NeedsPull(Exception):
    """A Hub reference that is not in the catalog yet (raised by ``Hive._resolve``)."""

    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference


def _pulled(entry: ModelEntry, downloaded: bool) -> ModelPulled:
    return ModelPulled(
        name=entry.name,
        reference=entry.reference,
        path=entry.path,
        size_bytes=entry.size_bytes,
        sha256=entry.sha256,
        downloaded=downloaded,
    )


class Hive:
    """A hive: its sockets, its workers and its jobs."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.node = config.node or socket.gethostname()
        self.catalog = Catalog(config.data_dir / "catalog.db")
        self.catalog.ensure_default()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.secure = config.secure or not config.loopback_only
        self.authorized = AuthorizedKeys(config.data_dir)
        self.keys = load_or_create(config.data_dir) if self.secure else None
        self.auth: ThreadAuthenticator | None = None
        front = new_socket(self.ctx, zmq.ROUTER)
        self.xpub = new_socket(self.ctx, zmq.XPUB)
        if self.keys is not None:
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", _KeyCheck(config.data_dir))
            for sock in (front, self.xpub):
                curve_server(sock, self.keys.public, self.keys.secret)
            logger.info(
                "CURVE on: only authorized keys get in",
                key=self.keys.fingerprint,
                authorized=len(self.authorized.roles()),
            )
        else:
            logger.info("development mode: loopback only, no keys", host=config.host)
        self.front_endpoint = bind_endpoint(front, config.host, config.port)
        self.front = RouterServer(front, curve=self.secure)
        self.role = "admin"  # of the request being handled (loop thread only)
        back = new_socket(self.ctx, zmq.ROUTER)
        back_endpoint = bind_endpoint(back, "127.0.0.1", 0)
        self.xsub = new_socket(self.ctx, zmq.XSUB)
        self.xsub.setsockopt(zmq.RCVHWM, LOCAL_HWM)
        xsub_endpoint = bind_endpoint(self.xsub, "127.0.0.1", 0)
        self.xsub.send(b"\x01")  # subscribe to every worker's every frame
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.SNDHWM, STREAM_HWM)
        self.stream_endpoint = bind_endpoint(self.xpub, config.host, config.stream_port)
        self.pool = WorkerPool(RouterServer(back), back_endpoint, xsub_endpoint)
        manager = DownloadManager(config.data_dir / "models")
        manager.clean_stale_parts()
        self.pulls = Pulls(manager)
        self.jobs: dict[str, JobRecord] = {}
        self.queue: list[JobRecord] = []  # FIFO of jobs waiting for a worker or a subscription
        self.subscribers: Counter[str] = Counter()
        self.dropped_stream_frames = 0
        self.draining_since = 0.0
        self.signals = 0
        self.stopped = False
        self.workers_at_drain = 0
        self.stopped_cleanly = 0
        self.handlers: dict[type[Frame], Callable[[bytes, int, Any], None]] = {
            Hello: self.on_hello,
            Status: self.on_status,
            EnsureWorker: self.on_ensure_worker,
            PullModel: self.on_pull_model,
            StartJob: self.on_start_job,
            Cancel: self.on_cancel,
            ListWorkers: self.on_list_workers,
            StopWorker: self.on_stop_worker,
            FetchFrames: self.on_fetch_frames,
        }

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        """The worker registry (id → record)."""
        return self.pool.workers

    @property
    def draining(self) -> bool:
        """Whether the hive is shutting down (it takes no new work)."""
        return self.draining_since > 0

    # ------------------------------------------------------------------ loop

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        """First call: drain gracefully. Second call: stop the workers now."""
        self.signals += 1
        if not self.draining:
            self.draining_since = time.monotonic()
            self.workers_at_drain = len(self.pool.workers)
            logger.info(
                "draining",
                running=sum(1 for j in self.jobs.values() if j.dispatched and not j.finished),
            )

    def serve(self, extra_fd: int | None = None) -> None:
        """Run until stopped; ``extra_fd`` closing (EOF) also stops an ephemeral hive."""
        poller = zmq.Poller()
        for sock in (self.front.sock, self.pool.back.sock, self.xsub, self.xpub):
            poller.register(sock, zmq.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, zmq.POLLIN)
        logger.info(
            "hive ready", node=self.node, router=self.front_endpoint, stream=self.stream_endpoint
        )
        try:
            while not self.stopped:
                events = dict(poller.poll(int(POLL_INTERVAL_S * 1000)))
                if self.xsub in events:
                    self._drain(self._on_stream)
                if self.xpub in events:
                    self._drain(self._on_subscription)
                if self.pool.back.sock in events:
                    self._drain(self._on_back)
                if self.front.sock in events:
                    self._drain(self._on_front)
                if extra_fd is not None and extra_fd in events and not os.read(extra_fd, 4096):
                    logger.info("the keeper that started this ephemeral hive is gone")
                    poller.unregister(extra_fd)
                    self.request_stop()
                    self.request_stop()  # nobody waits for running jobs: stop now
                self.housekeeping(time.monotonic())
        finally:
            self._close()

    @staticmethod
    def _drain(handle: Callable[[], None]) -> None:
        """Handle every frame waiting on a socket, bounded so no socket starves the others."""
        for _ in range(DRAIN_BATCH):
            try:
                handle()
            except zmq.Again:
                return

    def _on_front(self) -> None:
        incoming = self.front.recv()
        if incoming is None:
            return
        frame, rid = incoming.envelope.frame, incoming.envelope.rid
        handler = self.handlers.get(type(frame))
        try:
            if handler is None:
                raise InvalidRequest(f"a hive does not accept {frame.TYPE} frames from keepers")
            self.role = self.authorized.role(incoming.user) if self.secure else "admin"
            if not self.role:
                raise AccessDenied(
                    f"the key {fingerprint(incoming.user)} is no longer authorized on {self.node}",
                    suggestion="pair again: `rbee hive pair` there, `rbee pair NODE CODE` here",
                )
            if type(frame) in ADMIN_FRAMES:
                self._require_admin(frame.TYPE)
            handler(incoming.identity, rid, frame)
        except RbeeError as exc:
            self.front.reply_error(incoming.identity, rid, exc)
        except Exception as exc:  # a bug must not kill the daemon: answer and log it
            logger.exception("request failed", frame=frame.TYPE)
            self.front.reply_error(
                incoming.identity, rid, InternalError(f"{type(exc).__name__}: {exc}")
            )

    # ------------------------------------------------------------------ keeper requests

    def _require_admin(self, what: str) -> None:
        if self.role != "admin":
            raise AccessDenied(
                f"{what} needs the admin role; this keeper's key has the {self.role} role",
                suggestion="on the hive: `rbee hive authorize KEY --role admin`",
            )

    def on_hello(self, who: bytes, rid: int, frame: Hello) -> None:
        """Health and versions."""
        reply = HelloReply(
            node=self.node,
            rbee_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            pid=os.getpid(),
            stream_port=int(self.stream_endpoint.rsplit(":", 1)[1]),
            status="draining" if self.draining else "ok",
        )
        self.front.send(who, reply, rid)

    def on_status(self, who: bytes, rid: int, frame: Status) -> None:
        """Workers, catalog and free resources."""
        memory = psutil.virtual_memory()
        models = [
            ModelInfo(
                name=e.name,
                path=e.path,
                size_bytes=e.size_bytes,
                architecture=e.architecture,
                quantization=e.quantization,
                context_length=e.context_length,
                parameter_count=e.parameter_count,
            )
            for e in self.catalog.entries()
        ]
        status = HiveStatus(
            node=self.node,
            rbee_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            workers=self._worker_infos(),
            models=models,
            cpu_count=os.cpu_count() or 1,
            ram_total_bytes=memory.total,
            ram_free_bytes=memory.available,
            disk_free_bytes=psutil.disk_usage(str(self.config.data_dir)).free,
            queue_length=len(self.queue),
            max_workers=self.config.limits.max_workers,
        )
        self.front.send(who, status, rid)

    def on_list_workers(self, who: bytes, rid: int, frame: ListWorkers) -> None:
        """The worker registry."""
        self.front.send(who, WorkerList(workers=self._worker_infos()), rid)

    def _worker_infos(self) -> list[WorkerInfo]:
        infos = []
        for w in self.pool.records():
            try:
                rss = psutil.Process(w.pid).memory_info().rss
            except psutil.Error:
                rss = 0
            infos.append(w.info(rss))
        return infos

    def _resolve(self, reference: str) -> ModelEntry:
        if self.draining:
            raise HiveDraining(f"hive {self.node} is shutting down", retry_after_s=RETRY_AFTER_S)
        if is_hub_reference(reference):
            canonical = parse_reference(reference).canonical()
            entry = self.catalog.find_reference(canonical)
            if entry is None or not Path(entry.path).is_file():
                raise NeedsPull(canonical)
        else:
            entry = self.catalog.resolve(reference, allow_files=not self.secure)
        if self.catalog.get(entry.name) is not None:  # file: and synthetic: models have no row
            self.catalog.touch(entry.name)
        return entry

    def on_ensure_worker(self, who: bytes, rid: int, frame: EnsureWorker) -> None:
        """Reuse an idle worker holding the model, join one loading it, spawn one, or name a
        busy one (the job will queue); a Hub model not here yet is downloaded first."""
        try:
            entry = self._resolve(frame.model)
        except NeedsPull as need:
            self._require_admin(f"downloading {need.reference}")
            self.pulls.join(need.reference, who, rid, "ensure", frame.n_ctx)
            self.front.send(who, Progress(phase="download", message=need.reference), rid)
            return
        self._ensure(who, rid, entry, frame.n_ctx)

    def _ensure(self, who: bytes, rid: int, entry: ModelEntry, n_ctx: int) -> None:
        plan = plan_worker(self.pool.records(), entry.path, self.config.limits, self._fits(entry))
        if plan.action in ("reuse", "queue"):
            assert plan.worker is not None
            assigned = WorkerAssigned(
                worker_id=plan.worker.worker_id,
                model=plan.worker.model,
                reused=True,
                load_s=0,
                busy=plan.action == "queue",
            )
            self.front.send(who, assigned, rid)
            return
        if plan.action == "busy":
            self._refuse_busy(entry)
        if plan.action == "spawn":
            if plan.evict is not None:
                self.pool.stop(plan.evict, f"making room for {entry.name}")
            worker = self._spawn(entry, n_ctx)
            message = f"spawned worker {worker.worker_id} (pid {worker.pid}) for {entry.name}"
        else:
            assert plan.worker is not None
            worker = plan.worker
            message = f"waiting for worker {worker.worker_id}, already loading {entry.name}"
        worker.waiters.append((who, rid))
        self.front.send(who, Progress(phase="spawn", message=message), rid)

    def on_pull_model(self, who: bytes, rid: int, frame: PullModel) -> None:
        """Download a Hub model into the catalog (at once if it is already here)."""
        if not is_hub_reference(frame.reference):
            raise InvalidRequest(
                f"{frame.reference!r} is not a Hugging Face reference",
                suggestion="use hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf",
            )
        try:
            entry = self._resolve(frame.reference)
        except NeedsPull as need:
            self.pulls.join(need.reference, who, rid, "pull")
            self.front.send(who, Progress(phase="download", message=need.reference), rid)
            return
        self.front.send(who, _pulled(entry, downloaded=False), rid)

    def _on_pull_finished(self, done: Finished) -> None:
        if done.error is not None:
            for who, rid, _, _ in done.pull.waiters:
                self.front.reply_error(who, rid, done.error)
            return
        total = sum(f.size for f in done.files)
        finished = Progress(phase="download", done=total, total=total, message="verified")
        for who, rid, _, _ in done.pull.waiters:
            self.front.send(who, finished, rid)
        first = done.files[0]
        known = self.catalog.find_path(first.path)
        if known is not None:  # another spelling of a model already here
            for who, rid, purpose, n_ctx in done.pull.waiters:
                self._after_pull(who, rid, purpose, n_ctx, known, downloaded=False)
            return
        entry = self.catalog.add_pulled(
            first.path,
            reference=first.reference,
            repo=first.repo,
            file=first.filename,
            revision=first.commit,
            sha256=first.sha256,
            size_bytes=total,
        )
        logger.info("pulled", model=entry.name, reference=entry.reference, bytes=entry.size_bytes)
        for who, rid, purpose, n_ctx in done.pull.waiters:
            self._after_pull(who, rid, purpose, n_ctx, entry, downloaded=True)

    def _after_pull(
        self, who: bytes, rid: int, purpose: str, n_ctx: int, entry: ModelEntry, downloaded: bool
    ) -> None:
        if purpose == "pull":
            self.front.send(who, _pulled(entry, downloaded=downloaded), rid)
            return
        try:
            self._ensure(who, rid, entry, n_ctx)
        except RbeeError as exc:
            self.front.reply_error(who, rid, exc)

    def _fits(self, entry: ModelEntry) -> bool:
        """Whether one more worker of this model fits in free RAM (weights + margin)."""
        return entry.size_bytes + MEMORY_MARGIN_BYTES <= psutil.virtual_memory().available

    def _refuse_busy(self, entry: ModelEntry) -> None:
        if not self._fits(entry) and not any(
            w.model_path == entry.path for w in self.pool.records()
        ):
            free = psutil.virtual_memory().available
            raise InsufficientRam(
                f"{entry.name} needs about {(entry.size_bytes + MEMORY_MARGIN_BYTES) >> 20} MiB "
                f"of RAM; {free >> 20} MiB are free on {self.node}",
                suggestion="stop other workers (`rbee ps`) or use a smaller quantization",
            )
        raise AllSlotsBusy(
            f"all {self.config.limits.max_workers} workers of {self.node} are busy",
            retry_after_s=RETRY_AFTER_S,
            suggestion="try again shortly",
        )

    def _spawn(self, entry: ModelEntry, n_ctx: int) -> WorkerRecord:
        ctx = n_ctx or min(entry.context_length or DEFAULT_CTX_TOKENS, DEFAULT_CTX_TOKENS)
        worker = self.pool.spawn(entry.name, entry.path, ctx)
        worker.keep_alive_s = self.config.keep_alive_s
        return worker

    def on_start_job(self, who: bytes, rid: int, frame: StartJob) -> None:
        """Queue the job; it starts on an idle worker holding the model once the keeper's
        subscription is seen. The final reply (JobAccepted) comes when it starts."""
        if frame.job_id in self.jobs:
            raise InvalidRequest(f"job id {frame.job_id} is already in use")
        preferred = self.workers.get(frame.worker_id)
        if frame.worker_id and preferred is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        if preferred is not None:
            model, path = preferred.model, preferred.model_path
            if self.draining:
                raise HiveDraining(f"hive {self.node} is shutting down")
        else:
            try:
                entry = self._resolve(frame.model)
            except NeedsPull as need:
                raise ModelNotFound(
                    f"{need.reference} is not downloaded on {self.node} yet",
                    suggestion=f"`rbee models pull {need.reference}` (or run it with rbee infer)",
                ) from None
            model, path = entry.name, entry.path
        if len(self.queue) >= self.config.limits.max_queue:
            raise AllSlotsBusy(
                f"the queue of {self.node} is full ({len(self.queue)} jobs waiting)",
                retry_after_s=RETRY_AFTER_S,
                suggestion="try again shortly",
            )
        keep_alive = frame.keep_alive_s
        job = JobRecord(
            job_id=frame.job_id,
            model=model,
            model_path=path,
            keeper=who,
            rid=rid,
            params=frame.params,
            keep_alive_s=self.config.keep_alive_s
            if keep_alive == KEEP_ALIVE_DEFAULT
            else keep_alive,
            preferred_worker=frame.worker_id,
        )
        self.jobs[job.job_id] = job
        self.queue.append(job)
        self._schedule(time.monotonic())

    def _schedule(self, now: float) -> None:
        """Start queued jobs on idle workers (FIFO per model); keep waiting keepers informed."""
        for job in list(self.queue):
            if self.subscribers[job.job_id] == 0:
                if now - job.queued_at > SUBSCRIBE_TIMEOUT_S:
                    self._fail_queued(
                        job,
                        InvalidRequest(
                            f"the keeper did not subscribe to {job.job_id} within "
                            f"{SUBSCRIBE_TIMEOUT_S:.0f} s"
                        ),
                    )
                continue
            worker = pick_idle(self.pool.records(), job.model_path, job.preferred_worker)
            if worker is not None:
                self._dispatch(job, worker)
            elif now - job.queued_at > QUEUE_WAIT_S:
                self._fail_queued(
                    job,
                    AllSlotsBusy(
                        f"waited {QUEUE_WAIT_S:.0f} s in the queue of {self.node}",
                        retry_after_s=RETRY_AFTER_S,
                    ),
                )
        self._scale_for_queue()
        waiting = [j for j in self.queue if self.subscribers[j.job_id] > 0]
        for position, job in enumerate(waiting, start=1):
            if position != job.told_position or now - job.told_at >= PROGRESS_EVERY_S:
                job.told_position, job.told_at = position, now
                note = f"position {position} of {len(waiting)}"
                queued = Progress(phase="queued", done=position, total=len(waiting), message=note)
                self.front.send(job.keeper, queued, job.rid)

    def _scale_for_queue(self) -> None:
        """A queued job whose model has no worker coming may get a new one (within limits)."""
        if self.draining:
            return
        for job in self.queue:
            records = self.pool.records()
            coming = [
                w
                for w in records
                if w.model_path == job.model_path and w.state in ("idle", "loading")
            ]
            if coming:
                continue
            try:
                entry = self.catalog.resolve(job.model, allow_files=not self.secure)
            except RbeeError:
                continue
            plan = plan_worker(records, job.model_path, self.config.limits, self._fits(entry))
            if plan.action == "spawn":
                if plan.evict is not None:
                    self.pool.stop(plan.evict, f"making room for {entry.name}")
                self._spawn(entry, 0)

    def _dispatch(self, job: JobRecord, worker: WorkerRecord) -> None:
        self.queue.remove(job)
        job.dispatched, job.worker_id = True, worker.worker_id
        worker.state, worker.job_id = "busy", job.job_id
        worker.last_activity = time.time()
        self.front.send(
            job.keeper, JobAccepted(job_id=job.job_id, worker_id=worker.worker_id), job.rid
        )
        self.pool.send(worker, RunJob(job_id=job.job_id, params=job.params))

    def _fail_queued(self, job: JobRecord, error: RbeeError) -> None:
        self.queue.remove(job)
        self.front.reply_error(job.keeper, job.rid, error)
        job.frames.append(
            encode(StreamError(job_id=job.job_id, seq=0, code=error.code, message=error.message))
        )
        job.finished_at = time.monotonic()

    def on_cancel(self, who: bytes, rid: int, frame: Cancel) -> None:
        """Stop a job at its next token; canceling a finished job is harmless."""
        job = self.jobs.get(frame.job_id)
        if job is None:
            raise JobNotFound(f"no job {frame.job_id} on {self.node}")
        detail = "finished" if job.finished else "canceling"
        self._cancel(job)
        self.front.send(who, Ack(detail=detail), rid)

    def _cancel(self, job: JobRecord) -> None:
        if job.finished:
            return
        if job.dispatched:
            worker = self.workers.get(job.worker_id)
            if worker is not None:
                self.pool.send(worker, CancelJob(job_id=job.job_id))
        else:
            self._fail_queued(job, Canceled(f"job {job.job_id} was canceled while queued"))

    def on_stop_worker(self, who: bytes, rid: int, frame: StopWorker) -> None:
        """Ask a worker to exit (its running job is canceled first)."""
        worker = self.workers.get(frame.worker_id)
        if worker is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        self._stop_worker(worker, "asked by a keeper")
        self.front.send(who, Ack(detail=f"stopping {worker.worker_id}"), rid)

    def _stop_worker(self, worker: WorkerRecord, reason: str) -> None:
        job = self.jobs.get(worker.job_id)
        if job is not None:
            self._cancel(job)
        self.pool.stop(worker, reason)

    def on_fetch_frames(self, who: bytes, rid: int, frame: FetchFrames) -> None:
        """Resend a job's frames from a sequence number on (the gap-filling path)."""
        job = self.jobs.get(frame.job_id)
        if job is None:
            raise JobNotFound(f"no job {frame.job_id} on {self.node} (finished long ago?)")
        end = min(len(job.frames), frame.from_seq + MAX_FRAMES_PER_REPLY)
        frames = job.frames[frame.from_seq : end]
        finished = job.finished and end == len(job.frames)
        self.front.send(who, FramesReply(job_id=job.job_id, frames=frames, finished=finished), rid)

    # ------------------------------------------------------------------ streams

    def _on_stream(self) -> None:
        parts = self.xsub.recv_multipart(zmq.NOBLOCK)
        try:
            if len(parts) != 2:
                raise InvalidRequest("stream frames have two parts")
            frame = decode(parts[1]).frame
            if not isinstance(frame, Token | Done | StreamError):
                raise InvalidRequest(f"{frame.TYPE} is no stream frame")
        except RbeeError as exc:
            self.dropped_stream_frames += 1
            logger.warning("dropped a bad stream frame", error=str(exc))
            return
        job = self.jobs.get(frame.job_id)
        if job is None or job.finished or frame.seq != len(job.frames):
            self.dropped_stream_frames += 1
            return
        if isinstance(frame, Token):
            job.frames.append(parts[1])
            self.xpub.send_multipart(parts, zmq.NOBLOCK)  # drops at the HWM; FetchFrames heals
        else:
            self._finish(job, frame, parts[1])

    def _finish(self, job: JobRecord, terminal: Frame, data: bytes | None = None) -> None:
        """Record and publish a job's one terminal frame; its worker becomes idle."""
        data = data if data is not None else encode(terminal)
        job.frames.append(data)
        job.finished_at = time.monotonic()
        self.xpub.send_multipart([job.job_id.encode(), data], zmq.NOBLOCK)
        worker = self.workers.get(job.worker_id)
        if worker is not None and worker.job_id == job.job_id:
            worker.jobs_served += 1
            if worker.state == "busy":
                worker.became_idle(time.monotonic(), job.keep_alive_s)
            else:
                worker.job_id = ""
        self._schedule(time.monotonic())

    def _on_subscription(self) -> None:
        data = self.xpub.recv(zmq.NOBLOCK)
        if not data:
            return
        topic = data[1:].decode("utf-8", "replace")
        if data[0] == 1:
            self.subscribers[topic] += 1
            if topic in self.jobs:
                self._schedule(time.monotonic())
        elif data[0] == 0 and self.subscribers[topic] > 0:
            self.subscribers[topic] -= 1
            if self.subscribers[topic] == 0:
                del self.subscribers[topic]
                job = self.jobs.get(topic)
                if job is not None and not job.finished:
                    logger.info("keeper went away; canceling its job", job=topic)
                    self._cancel(job)

    # ------------------------------------------------------------------ workers

    def _on_back(self) -> None:
        incoming = self.pool.back.recv()
        if incoming is not None:
            for event in self.pool.on_frame(
                incoming.identity, incoming.envelope.frame, time.monotonic()
            ):
                self._on_worker_event(event)

    def _on_worker_event(self, event: Event) -> None:
        worker = event.worker
        if event.kind == "registered":
            self._tell_waiters(worker, Progress(phase="registered", message=worker.worker_id))
        elif event.kind == "loading":
            self._tell_waiters(worker, self._loading(worker))
        elif event.kind == "ready":
            worker.became_idle(time.monotonic(), worker.keep_alive_s)
            assigned = WorkerAssigned(
                worker_id=worker.worker_id, model=worker.model, reused=False, load_s=worker.load_s
            )
            self._tell_waiters(worker, assigned)
            worker.waiters.clear()
            self._schedule(time.monotonic())
        elif event.kind in ("load_failed", "exited"):
            if event.error is not None:
                for who, rid in worker.waiters:
                    self.front.reply_error(who, rid, event.error)
            worker.waiters.clear()
            if event.kind == "exited":
                self.stopped_cleanly += event.exit_code == 0
                self._worker_gone(worker, event)

    @staticmethod
    def _loading(worker: WorkerRecord) -> Progress:
        return Progress(phase="loading", done=worker.loaded_fraction, total=1.0)

    def _tell_waiters(self, worker: WorkerRecord, frame: Frame) -> None:
        for who, rid in worker.waiters:
            self.front.send(who, frame, rid)

    def _worker_gone(self, worker: WorkerRecord, event: Event) -> None:
        """A worker process ended: a job it was running ends with WORKER_CRASHED."""
        job = self.jobs.get(worker.job_id)
        if job is None or job.finished:
            return
        tail = event.stderr_tail[-2000:]
        error = WorkerCrashed(
            f"worker {worker.worker_id} exited with code {event.exit_code} during job "
            f"{job.job_id}" + (f"; its last output:\n{tail}" if tail else "")
        )
        self._finish(
            job,
            StreamError(
                job_id=job.job_id,
                seq=len(job.frames),
                code=error.code,
                message=error.message[:16000],
            ),
        )

    def housekeeping(self, now: float) -> None:
        """Reap workers, unload idle ones, keep waiting keepers informed, trim old jobs, drain."""
        for event in self.pool.reap(now):
            self._on_worker_event(event)
        for done in self.pulls.finished():
            self._on_pull_finished(done)
        for pull in self.pulls.due_progress(now):
            progress = Progress(
                phase="download",
                done=pull.done_bytes,
                total=pull.total_bytes,
                message=describe_progress(pull),
            )
            for who, rid, _, _ in pull.waiters:
                self.front.send(who, progress, rid)
        for worker in idle_expired(self.pool.records(), now):
            self.pool.stop(worker, f"idle for its keep-alive of {worker.keep_alive_s:g} s")
        for worker in self.pool.records():
            if (
                worker.state == "loading"
                and worker.waiters
                and now - worker.last_progress >= PROGRESS_EVERY_S
            ):
                self._tell_waiters(worker, self._loading(worker))
        self._schedule(now)
        for job_id in expired_jobs(list(self.jobs.values()), now):
            del self.jobs[job_id]
        if self.draining:
            self._drain_step(now)

    def _drain_step(self, now: float) -> None:
        """Refuse queued work, let running jobs finish within the grace, then stop workers."""
        for job in list(self.queue):
            self._fail_queued(job, HiveDraining(f"hive {self.node} is shutting down"))
        running = [j for j in self.jobs.values() if j.dispatched and not j.finished]
        overdue = now - self.draining_since > self.config.drain_grace_s or self.signals > 1
        if running and overdue:
            for job in running:
                self._cancel(job)
        if not running or overdue:
            for worker in self.pool.records():
                self.pool.stop(worker, "the hive is stopping")
        if not self.pool.workers:
            self.stopped = True

    def _close(self) -> None:
        self.pulls.close()
        if self.auth is not None:
            self.auth.stop()
        total = len(self.pool.workers)
        if total:  # the loop ended early (an exception): force what is left
            for worker in self.pool.records():
                self.pool.kill(worker)
        for sock in (self.front.sock, self.pool.back.sock, self.xsub, self.xpub):
            sock.close(0)
        self.ctx.term()
        self.catalog.close()
        logger.info(
            "hive stopped",
            node=self.node,
            workers=f"{self.stopped_cleanly}/{self.workers_at_drain} stopped cleanly",
            killed_at_exit=total,
        )
