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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq
from zmq.auth.thread import ThreadAuthenticator

from rbee import __version__, gpu, log
from rbee.catalog import Catalog
from rbee.errors import (
    AccessDenied,
    HiveDraining,
    InternalError,
    InvalidRequest,
    RbeeError,
    WorkerCrashed,
    WorkerNotFound,
)
from rbee.hive import probe
from rbee.hive.jobs import JobDesk
from rbee.hive.pool import SIGNAL_HINT, Event, WorkerPool
from rbee.hive.provision import Provisioner
from rbee.hive.pulls import Pulls, describe_progress
from rbee.hive.registry import (
    JobRecord,
    WorkerRecord,
    expired_jobs,
    idle_expired,
)
from rbee.hive.settings import HiveConfig
from rbee.hive.streams import StreamGate
from rbee.hub.layout import clean_stale_parts
from rbee.llamacpp import EngineChoice, default_threads
from rbee.paths import cache_dir
from rbee.protocol.codec import REQUESTS
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    EnsureWorker,
    FetchFrames,
    Frame,
    GetLogs,
    Hello,
    HelloReply,
    HiveStatus,
    ListWorkers,
    LogLines,
    Progress,
    PullModel,
    StartJob,
    Status,
    StopWorker,
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
ENGINE_TEXT_CHARS = 1024
FRONT_HWM = 64  # requests queued per keeper connection while the loop is busy
SUBSCRIPTION_BYTES = 4096  # a subscription names one job's topic (CURVE's handshake is ~300 B)

logger = log.get(__name__)


ADMIN_FRAMES = (PullModel, StopWorker, GetLogs)


class _KeyCheck:
    """The ZAP callback: a CURVE client gets in only with an authorized key (runs on the
    authenticator's thread, so it has its own view of the file)."""

    def __init__(self, data_dir: Path) -> None:
        self.keys = AuthorizedKeys(data_dir)

    def callback(self, domain: str, key: bytes) -> bool:
        return bool(self.keys.role(key.decode("ascii", "replace")))


class Hive(JobDesk, Provisioner):
    """A hive: its sockets, its workers and its jobs."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.node = config.node or socket.gethostname()
        log.bind(node=self.node)
        self.catalog = Catalog(config.data_dir / "catalog.db")
        self.catalog.ensure_default()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.secure = config.secure or not config.loopback_only
        self.authorized = AuthorizedKeys(config.data_dir)
        self.keys = load_or_create(config.data_dir) if self.secure else None
        self.auth: ThreadAuthenticator | None = None
        try:
            front = new_socket(self.ctx, zmq.ROUTER, REQUESTS)
            front.setsockopt(zmq.RCVHWM, FRONT_HWM)
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
            self.front = RouterServer(front, curve=self.secure, bounds=REQUESTS)
            self.role = "admin"  # of the request being handled (loop thread only)
            self.caller = ""
            back = new_socket(self.ctx, zmq.ROUTER)
            back_endpoint = bind_endpoint(back, "127.0.0.1", 0)
            self.xsub = new_socket(self.ctx, zmq.XSUB)
            self.xsub.setsockopt(zmq.RCVHWM, LOCAL_HWM)
            xsub_endpoint = bind_endpoint(self.xsub, "127.0.0.1", 0)
            self.xsub.send(b"\x01")  # subscribe to every worker's every frame
            self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)  # the hive applies each subscription itself
            self.xpub.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_BYTES)
            self.xpub.setsockopt(zmq.SNDHWM, STREAM_HWM)
            self.stream_endpoint = bind_endpoint(
                self.xpub, config.host, config.stream_port, "--stream-port"
            )
        except BaseException:  # a port in use, an address not here: leave no thread behind
            if self.auth is not None:
                self.auth.stop()
            self.ctx.destroy(linger=0)
            self.catalog.close()
            raise
        self.engine = self._choose_engine()
        self.pool = WorkerPool(RouterServer(back), back_endpoint, xsub_endpoint, self.engine)
        clean_stale_parts(config.data_dir / "models")  # left by downloads cut short
        self.pulls = Pulls(config.data_dir / "models")
        self.jobs: dict[str, JobRecord] = {}
        self.queue: list[JobRecord] = []  # FIFO of jobs waiting for a worker or a subscription
        self.streams = StreamGate()
        self.dropped_stream_frames = 0
        self.draining_since = 0.0
        self.signals = 0
        self.stopped = False
        self.workers_at_drain = 0
        self.stopped_cleanly = 0
        self.wants = {}
        # Whether llama.cpp can offload is asked once, off the loop (importing it takes 0.2-1 s).
        threading.Thread(target=gpu.llama_gpu_offload, name="gpu-probe", daemon=True).start()
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
            GetLogs: self.on_get_logs,
        }

    def _choose_engine(self) -> EngineChoice:
        """How workers run llama.cpp here: probed with the smallest model at hand, or cached."""
        models = [
            e
            for e in self.catalog.entries()
            if e.path and 0 < e.size_bytes <= probe.PROBE_MAX_MODEL_BYTES
        ]
        models = [e for e in models if Path(e.path).is_file()]
        smallest = min(models, key=lambda e: e.size_bytes).path if models else None
        threads = self.config.threads or default_threads()
        choice = probe.choose(cache_dir(), smallest, threads)
        log_at = logger.info if choice.proven and not choice.note else logger.warning
        log_at("engine", setting=choice.describe())
        return choice

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
            self.caller = incoming.user if self.secure else ""
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

    def on_get_logs(self, who: bytes, rid: int, frame: GetLogs) -> None:
        """Recent log lines of the hive and its workers (`rbee logs`)."""
        lines, last = log.RECENT.since(frame.after, frame.worker_id, frame.limit)
        unknown = frame.worker_id and frame.worker_id not in self.workers
        if unknown and not lines and frame.after == 0:  # a worker gone long ago, or never here
            raise WorkerNotFound(
                f"no worker {frame.worker_id} on {self.node}, nor lines of one in its recent log",
                suggestion="`rbee ps` lists the workers",
            )
        self.front.send(who, LogLines(lines=lines, last=last), rid)

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
        models = [e.info() for e in self.catalog.entries()]
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
            devices=gpu.detect().device_infos(),
            engine=self.engine.describe()[:ENGINE_TEXT_CHARS],
        )
        self.front.send(who, status, rid)

    def on_list_workers(self, who: bytes, rid: int, frame: ListWorkers) -> None:
        """The worker registry."""
        self.front.send(who, WorkerList(workers=self._worker_infos()), rid)

    def _worker_infos(self) -> list[WorkerInfo]:
        """The workers as the caller may see them: the id of a job shows to its owner and to
        admins only (an id would let another key ask for the job's frames)."""
        infos = []
        for w in self.pool.records():
            try:
                rss = psutil.Process(w.pid).memory_info().rss
            except psutil.Error:
                rss = 0
            vram = gpu.process_vram_bytes(w.pid) if w.backend == "cuda" else None
            job = self.jobs.get(w.job_id)
            shown = self.role == "admin" or (job is not None and job.owner == self.caller)
            infos.append(w.info(rss, vram, shown))
        return infos

    def on_stop_worker(self, who: bytes, rid: int, frame: StopWorker) -> None:
        """Ask a worker to exit (its running job is canceled first)."""
        worker = self.workers.get(frame.worker_id)
        if worker is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        key = f"an admin key ({fingerprint(self.caller)})" if self.caller else "a keeper"
        by = f"{key} stopping worker {worker.worker_id}"
        job = self.jobs.get(worker.job_id)
        if job is not None:
            self._cancel(job, by)
        self.pool.stop(worker, "asked by a keeper")
        self.front.send(who, Ack(detail=f"stopping {worker.worker_id}"), rid)

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
        if job.canceled_by:  # stopped on purpose before its Done came: not a crash
            self._fail(job, self._ended_by_other(job, f"after {len(job.frames)} tokens"))
            return
        tail = event.stderr_tail[-2000:]
        how = f"exited with code {event.exit_code}"
        early = event.exit_code < 0 and not job.frames  # a signal before the first token
        if early:
            how += f" ({self.pool.signal_death(event.exit_code)}) before its first token"
        error = WorkerCrashed(
            f"worker {worker.worker_id} {how} during job {job.job_id}"
            + (f"; its last output:\n{tail}" if tail else ""),
            suggestion=SIGNAL_HINT if early else "",
        )
        self._fail(job, error)

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
            self.streams.forget(job_id)
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
                self._cancel(job, "the hive shutting down")
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
