"""The hive's event loop: one thread owns every socket and carries out every decision.

Sockets:

* ``front``  ROUTER, the only request socket on the network: keepers' requests.
* ``back``   ROUTER on loopback: this hive's workers (progress, Ready, heartbeats).
* ``xsub``   XSUB on loopback: workers' token streams; it subscribes to everything, so the
  worker → hive hop never filters or drops.
* ``xpub``   XPUB on the network: keepers' SUB sockets. It runs verbose, so the loop sees each
  subscription and starts a job only once its keeper is listening (no lost first tokens).

Every stream frame passing through is validated and kept per job, so a keeper that missed frames
(slow reader, high-water mark) gets them again with FetchFrames. Jobs that find no free slot of a
worker wait in a bounded FIFO queue. SIGTERM drains: no new work, running jobs get a grace period,
then workers are asked, told (SIGTERM) and finally forced (SIGKILL) to stop.
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
from rbee.config import parse_size
from rbee.errors import (
    AccessDenied,
    HiveDraining,
    InternalError,
    InvalidRequest,
    RbeeError,
    WorkerNotFound,
)
from rbee.hive import probe
from rbee.hive.borrow import Tunnel
from rbee.hive.jobs import JobDesk
from rbee.hive.lendable import lendable
from rbee.hive.lending import LendingDesk
from rbee.hive.metrics import HiveMetrics, MetricsServer, require_loopback
from rbee.hive.peer_files import PeerFiles
from rbee.hive.peers import Peers, trusted_hives
from rbee.hive.placement import Lender
from rbee.hive.pool import Event, WorkerPool
from rbee.hive.provision import Provisioner
from rbee.hive.registry import JobRecord, WorkerRecord, idle_expired
from rbee.hive.request import Replies, Request, Role
from rbee.hive.settings import HiveConfig
from rbee.hive.sharing import Sharing
from rbee.hub.layout import clean_stale_parts
from rbee.llamacpp import EngineChoice, default_threads
from rbee.paths import cache_dir
from rbee.protocol.codec import REQUESTS
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    EnsureWorker,
    Explain,
    FetchFrames,
    FileQuery,
    Frame,
    GetLogs,
    Hello,
    HelloReply,
    HiveStatus,
    LeasePing,
    ListWorkers,
    LogLines,
    Metrics,
    MetricsText,
    PipeClose,
    PipeData,
    PipeOpen,
    PullModel,
    ReadChunk,
    StartJob,
    Status,
    StopWorker,
    WorkerInfo,
    WorkerList,
)
from rbee.transport.keys import AuthorizedKeys, KnownHives, fingerprint, load_or_create
from rbee.transport.sockets import (
    LOCAL_HWM,
    STREAM_HWM,
    Curve,
    RouterServer,
    bind_endpoint,
    curve_server,
    new_socket,
)

POLL_INTERVAL_S = 0.1
HOUSEKEEPING_EVERY_S = 0.1  # reaping, keep-alives, queue reports: not on every token relayed
DRAIN_BATCH = 1000
SLOW_REQUEST_S = 0.05  # a request that holds the loop this long is logged (tokens wait on it)
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


Handler = Callable[[Request, Any], None]


class Hive:
    """A hive: its sockets and its loop, and the parts that own the rest: the pool (worker
    processes), the provisioner (models, downloads, and requests waiting for a worker) and the
    job desk (the queue and the token streams)."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        if parse_size(config.memory_limit):  # rbee.gpu.cpu_info plans with it
            os.environ["RBEE_MEMORY_LIMIT"] = config.memory_limit
        self.node = config.node or socket.gethostname()
        log.bind(node=self.node)
        if config.metrics_port:
            require_loopback(config.metrics_host)
        self.metrics = HiveMetrics(self.node)
        self.metrics_server: MetricsServer | None = None  # started by serve
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
        known = KnownHives(config.data_dir)
        self.peers = None if self.keys is None else Peers(self.keys, known)
        keys = self.keys
        peer_files = None if keys is None else PeerFiles(keys, lambda: trusted_hives(keys, known))
        self.pool = WorkerPool(
            RouterServer(back),
            back_endpoint,
            xsub_endpoint,
            self.engine,
            self.config.stream_interval_ms,
            self._tunnel if self.keys is not None else None,
            lender_stall_s=config.lender_stall_s,
        )
        clean_stale_parts(config.data_dir / "models")  # left by downloads cut short
        self.replies = Replies(self.front)
        share_rate = parse_size(config.share_rate)
        self.sharing = Sharing(self.replies, self.catalog, config.data_dir / "models", share_rate)
        self.provisioner = Provisioner(
            config,
            self.node,
            self.catalog,
            self.pool,
            self.replies,
            lambda: self.draining,
            self.peers.lenders if self.peers is not None else tuple,
            metrics=self.metrics,
            peers=peer_files,
        )
        if self.peers is not None:
            self.peers.start()
        self.desk = JobDesk(
            config,
            self.node,
            self.pool,
            self.provisioner,
            self.replies,
            (self.xsub, self.xpub),
            lambda: self.draining,
            metrics=self.metrics,
        )
        self.poller = zmq.Poller()
        self.lending = LendingDesk(
            self.replies,
            self.poller,
            config.data_dir / "rpc-cache",
            self.engine.threads,
            self.engine.worker_env(),
            config.lend,
            lambda: self.draining,
            lambda: lendable(self.provisioner.inventory()),
        )
        self.draining_since = 0.0
        self.signals = 0
        self.stopped = False
        self.workers_at_drain = 0
        self.stopped_cleanly = 0
        # Whether llama.cpp can offload is asked once, off the loop (importing it takes 0.2-1 s).
        threading.Thread(target=gpu.llama_gpu_offload, name="gpu-probe", daemon=True).start()
        self.handlers: dict[type[Frame], Handler] = {
            Hello: self.on_hello,
            Status: self.on_status,
            EnsureWorker: self.provisioner.on_ensure_worker,
            PullModel: self.provisioner.on_pull_model,
            StartJob: self.desk.on_start_job,
            Cancel: self.desk.on_cancel,
            ListWorkers: self.on_list_workers,
            Explain: self.provisioner.on_explain,
            StopWorker: self.on_stop_worker,
            FetchFrames: self.desk.on_fetch_frames,
            GetLogs: self.on_get_logs,
            Metrics: self.on_metrics,
            PipeOpen: self.lending.on_open,
            PipeData: self.lending.on_data,
            PipeClose: self.lending.on_close,
            LeasePing: self.lending.on_ping,
            FileQuery: self.sharing.on_query,
            ReadChunk: self.sharing.on_read,
        }

    def _tunnel(self, lender: Lender, lease: str, model: str) -> Tunnel:
        """A link for a worker's RPC connection to a lender hive, with this hive's key."""
        assert self.keys is not None
        curve = Curve(self.keys.public, self.keys.secret, lender.key)
        return Tunnel(self.ctx, lender.endpoint, curve, lease, model, lender.node)

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        """The worker registry (id → record), the pool's."""
        return self.pool.workers

    @property
    def jobs(self) -> dict[str, JobRecord]:
        """The jobs the desk knows (running, queued, and finished ones kept for fetches)."""
        return self.desk.jobs

    @property
    def draining(self) -> bool:
        """Whether the hive is shutting down (it takes no new work)."""
        return self.draining_since > 0

    def preload(self, reference: str) -> None:
        """Start loading a worker for ``reference`` before anyone asks (an ephemeral hive's)."""
        self.provisioner.preload(reference)

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
            logger.info("draining", running=len(self.desk.running()))

    def serve(self, extra_fd: int | None = None) -> None:
        """Run until stopped; ``extra_fd`` closing (EOF) also stops an ephemeral hive."""
        poller = self.poller
        for sock in (self.front.sock, self.pool.back.sock, self.xsub, self.xpub):
            poller.register(sock, zmq.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, zmq.POLLIN)
        next_housekeeping = 0.0
        try:
            endpoints = {"router": self.front_endpoint, "stream": self.stream_endpoint}
            if self.config.metrics_port:
                host, port = self.config.metrics_host, self.config.metrics_port
                self.metrics_server = self.metrics.serve(host, port)
                endpoints["metrics"] = self.metrics_server.url
            logger.info("hive ready", node=self.node, **endpoints)
            while not self.stopped:
                due = self.sharing.due_in(time.monotonic())
                wait_s = POLL_INTERVAL_S if due is None else min(max(due, 0.001), POLL_INTERVAL_S)
                events = dict(poller.poll(int(wait_s * 1000) or 1))
                if self.xsub in events:
                    self._drain(self.desk.on_stream)
                if self.xpub in events:
                    self._drain(self.desk.on_subscription)
                if self.pool.back.sock in events:
                    self._drain(self._on_back)
                if self.front.sock in events:
                    self._drain(self._on_front)
                if self.lending.by_fd:  # lenders' sockets: only while this hive lends
                    for fd, flags in events.items():
                        if isinstance(fd, int) and self.lending.owns(fd):
                            self.lending.on_ready(fd, flags)
                if extra_fd is not None and extra_fd in events and not os.read(extra_fd, 4096):
                    logger.info("the keeper that started this ephemeral hive is gone")
                    poller.unregister(extra_fd)
                    self.request_stop()
                    self.request_stop()  # nobody waits for running jobs: stop now
                now = time.monotonic()
                self.sharing.tick(now)  # chunks held back by the share rate
                if now >= next_housekeeping or not events:
                    self.housekeeping(now)
                    next_housekeeping = now + HOUSEKEEPING_EVERY_S
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
        if self.lending.leases:  # any frame of a borrower keeps its loans alive
            self.lending.seen(incoming.identity)
        try:
            if handler is None:
                raise InvalidRequest(f"a hive does not accept {frame.TYPE} frames from keepers")
            request = Request(
                incoming.identity, rid, self._role(incoming.user), self._key(incoming.user)
            )
            if type(frame) in ADMIN_FRAMES:
                request.require_admin(frame.TYPE)
            started = time.perf_counter()
            handler(request, frame)
            took = time.perf_counter() - started
            if took > SLOW_REQUEST_S:
                logger.warning("slow request", frame=frame.TYPE, ms=round(took * 1000, 1))
        except RbeeError as exc:
            if isinstance(frame, StartJob):  # refused before it was queued (ALL_SLOTS_BUSY …)
                self.metrics.job_failed("", exc.code)
            self.front.reply_error(incoming.identity, rid, exc)
        except Exception as exc:  # a bug must not kill the daemon: answer and log it
            logger.exception("request failed", frame=frame.TYPE)
            self.front.reply_error(incoming.identity, rid, InternalError.of(exc))

    # ------------------------------------------------------------------ keeper requests

    def _role(self, key: str) -> Role:
        """The role of the caller's key, checked at each request (a revoked key is refused at
        once); every caller of a development-mode hive is on this machine: admin."""
        if not self.secure:
            return "admin"
        role = self.authorized.role(key)
        if role not in ("admin", "infer", "hive"):
            raise AccessDenied(
                f"the key {fingerprint(key)} is no longer authorized on {self.node}",
                suggestion="pair again: `rbee hive pair` there, `rbee pair NODE CODE` here",
            )
        return "admin" if role == "admin" else "hive" if role == "hive" else "infer"

    def _key(self, key: str) -> str:
        return key if self.secure else ""

    def on_get_logs(self, request: Request, frame: GetLogs) -> None:
        """Recent log lines of the hive and its workers (`rbee logs`)."""
        lines, last = log.RECENT.since(frame.after, frame.worker_id, frame.limit)
        unknown = frame.worker_id and frame.worker_id not in self.workers
        if unknown and not lines and frame.after == 0:  # a worker gone long ago, or never here
            raise WorkerNotFound(
                f"no worker {frame.worker_id} on {self.node}, nor lines of one in its recent log",
                suggestion="`rbee ps` lists the workers",
            )
        self.replies.send(request, LogLines(lines=lines, last=last))

    def on_metrics(self, request: Request, frame: Metrics) -> None:
        """The hive's Prometheus metrics, the gauges of the present refreshed first."""
        self.metrics.refresh(len(self.desk.queue), self.pool.records(), time.monotonic())
        self.replies.send(request, MetricsText(text=self.metrics.text()))

    def on_hello(self, request: Request, frame: Hello) -> None:
        """Health and versions."""
        reply = HelloReply(
            node=self.node,
            rbee_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            pid=os.getpid(),
            stream_port=int(self.stream_endpoint.rsplit(":", 1)[1]),
            status="draining" if self.draining else "ok",
        )
        self.replies.send(request, reply)

    def on_status(self, request: Request, frame: Status) -> None:
        """Workers, catalog and free resources."""
        memory = gpu.cpu_info()  # under the hive's memory limit, if it has one
        lent = self.lending.lendable()  # GPUs before CPUs (rbee.hive.lendable)
        models = [e.info() for e in self.catalog.entries()]
        status = HiveStatus(
            node=self.node,
            rbee_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            workers=self._worker_infos(request),
            models=models,
            cpu_count=os.cpu_count() or 1,
            ram_total_bytes=memory.ram_total_bytes,
            ram_free_bytes=memory.ram_free_bytes,
            disk_free_bytes=psutil.disk_usage(str(self.config.data_dir)).free,
            queue_length=len(self.desk.queue),
            max_workers=self.config.limits.max_workers,
            devices=self.provisioner.inventory().device_infos(),
            engine=self.engine.describe()[:ENGINE_TEXT_CHARS],
            lends=self.lending.enabled,
            lendable_bytes=lent.free_bytes if self.lending.enabled else 0,
            lendable_kind=lent.kind,
            lends_to_you=self.lending.enabled and request.role in ("hive", "admin"),
            errors=list(self.desk.errors),
        )
        self.replies.send(request, status)

    def on_list_workers(self, request: Request, frame: ListWorkers) -> None:
        """The worker registry."""
        self.replies.send(request, WorkerList(workers=self._worker_infos(request)))

    def _worker_infos(self, request: Request) -> list[WorkerInfo]:
        """The workers as the caller may see them: the id of a job shows to its owner and to
        admins only (an id would let another key ask for the job's frames); a worker running
        several jobs shows the oldest one the caller may see."""
        infos = []
        for w in self.pool.records():
            rss = gpu.process_rss_bytes(w.pid)
            vram = (w.vram_bytes or gpu.process_vram_bytes(w.pid)) if w.backend == "cuda" else None
            infos.append(w.info(rss, vram, lambda job_id: self.desk.shown_to(request, job_id)))
        return infos

    def on_stop_worker(self, request: Request, frame: StopWorker) -> None:
        """Ask a worker to exit (its running jobs are stopped first, and their keepers told
        who)."""
        worker = self.workers.get(frame.worker_id)
        if worker is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        self.desk.cancel_on(worker, f"{request.describe()} stopping worker {worker.worker_id}")
        self.pool.stop(worker, "asked by a keeper")
        self.replies.send(request, Ack(detail=f"stopping {worker.worker_id}"))

    # ------------------------------------------------------------------ workers

    def _on_back(self) -> None:
        incoming = self.pool.back.recv()
        if incoming is not None:
            for event in self.pool.on_frame(
                incoming.identity, incoming.envelope.frame, time.monotonic()
            ):
                self._on_worker_event(event)

    def _on_worker_event(self, event: Event) -> None:
        """Something happened to a worker: its waiting requests hear of it, and the desk
        schedules onto its slots (ready) or ends every job it ran (exited)."""
        self.provisioner.on_worker_event(event)
        if event.kind == "ready":
            self.metrics.worker_loaded(event.worker)
            event.worker.became_idle(time.monotonic(), event.worker.keep_alive_s)
            self.desk.schedule(time.monotonic())
        elif event.kind == "exited":
            self.stopped_cleanly += event.exit_code == 0
            self.desk.on_worker_gone(event)

    def housekeeping(self, now: float) -> None:
        """Reap workers, unload idle ones, keep waiting keepers informed, trim old jobs, drain."""
        for event in self.pool.reap(now):
            self._on_worker_event(event)
        self.provisioner.tick(now)
        self.lending.housekeeping(now)
        for worker in idle_expired(self.pool.records(), now):
            self.pool.stop(worker, f"idle for its keep-alive of {worker.keep_alive_s:g} s")
        self.desk.schedule(now)
        self.desk.forget_expired(now)
        if self.metrics_server is not None and self.metrics.due(now):
            self.metrics.refresh(len(self.desk.queue), self.pool.records(), now)
        if self.draining:
            self._drain_step(now)

    def _drain_step(self, now: float) -> None:
        """Refuse queued work, let running jobs finish within the grace, then stop workers."""
        for job in list(self.desk.queue):
            self.desk.fail_queued(job, HiveDraining(f"hive {self.node} is shutting down"))
        running = self.desk.running()
        overdue = now - self.draining_since > self.config.drain_grace_s or self.signals > 1
        if running and overdue:
            for job in running:
                self.desk.cancel(job, "the hive shutting down")
        if not running or overdue:
            for worker in self.pool.records():
                self.pool.stop(worker, "the hive is stopping")
        if not self.pool.workers:
            self.stopped = True

    def _close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.provisioner.pulls.close()
        self.lending.close_all()
        if self.peers is not None:
            self.peers.close()
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
