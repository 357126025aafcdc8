"""The hive's event loop: one thread owns every socket and every decision's side effects.

Sockets:

* ``front``  ROUTER, the only request socket on the network: keepers' requests.
* ``back``   ROUTER on loopback: this hive's workers (progress, Ready, heartbeats).
* ``xsub``   XSUB on loopback: workers' token streams; it subscribes to everything, so the
  worker → hive hop never filters or drops.
* ``xpub``   XPUB on the network: keepers' SUB sockets. It runs verbose, so the loop sees each
  subscription and starts a job only once its keeper is listening (no lost first tokens).

Every stream frame passing through is validated and kept per job, so a keeper that missed frames
(slow reader, high-water mark) gets them again with FetchFrames.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import zmq

from rbee import __version__, log
from rbee.catalog import Catalog
from rbee.errors import (
    AllSlotsBusy,
    InvalidRequest,
    JobNotFound,
    RbeeError,
    WorkerCrashed,
    WorkerNotFound,
    WorkerStartFailed,
)
from rbee.hive.registry import JobRecord, WorkerRecord, expired_jobs, pick_idle, pick_loading
from rbee.hive.supervisor import TERM_GRACE_S, WorkerProcess, signal_worker, spawn_worker
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    CancelJob,
    Done,
    EnsureWorker,
    FetchFrames,
    Frame,
    FramesReply,
    Heartbeat,
    Hello,
    HelloReply,
    HiveStatus,
    JobAccepted,
    ListWorkers,
    ModelInfo,
    Progress,
    RunJob,
    StartJob,
    Status,
    StopRequest,
    StopWorker,
    StreamError,
    Token,
    WorkerAssigned,
    WorkerFailed,
    WorkerList,
    WorkerLoading,
    WorkerReady,
)
from rbee.transport.sockets import LOCAL_HWM, STREAM_HWM, RouterServer, bind_endpoint, new_socket

POLL_INTERVAL_S = 0.1
SUBSCRIBE_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_S = 10.0
LOAD_STALL_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
MAX_FRAMES_PER_REPLY = 8192
DRAIN_BATCH = 1000
DEFAULT_CTX_TOKENS = 4096
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

    @property
    def loopback_only(self) -> bool:
        """Development mode: nothing but this machine can reach the hive."""
        return self.host in LOOPBACK_HOSTS


class Hive:
    """A hive: its sockets, its workers and its jobs."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.node = config.node or socket.gethostname()
        self.catalog = Catalog(config.data_dir / "catalog.db")
        self.catalog.ensure_default()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        front = new_socket(self.ctx, zmq.ROUTER)
        front.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.front_endpoint = bind_endpoint(front, config.host, config.port)
        self.front = RouterServer(front)
        back = new_socket(self.ctx, zmq.ROUTER)
        self.back_endpoint = bind_endpoint(back, "127.0.0.1", 0)
        self.back = RouterServer(back)
        self.xsub = new_socket(self.ctx, zmq.XSUB)
        self.xsub.setsockopt(zmq.RCVHWM, LOCAL_HWM)
        self.xsub_endpoint = bind_endpoint(self.xsub, "127.0.0.1", 0)
        self.xsub.send(b"\x01")  # subscribe to every worker's every frame
        self.xpub = new_socket(self.ctx, zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.SNDHWM, STREAM_HWM)
        self.stream_endpoint = bind_endpoint(self.xpub, config.host, config.stream_port)
        self.workers: dict[str, WorkerRecord] = {}
        self.procs: dict[str, WorkerProcess] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.subscribers: Counter[str] = Counter()
        self.stopping = False
        self.dropped_stream_frames = 0
        self.handlers: dict[type[Frame], Callable[[bytes, int, Any], None]] = {
            Hello: self.on_hello,
            Status: self.on_status,
            EnsureWorker: self.on_ensure_worker,
            StartJob: self.on_start_job,
            Cancel: self.on_cancel,
            ListWorkers: self.on_list_workers,
            StopWorker: self.on_stop_worker,
            FetchFrames: self.on_fetch_frames,
        }

    # ------------------------------------------------------------------ loop

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        """First signal: stop gracefully. (The loop finishes the turn it is in.)"""
        self.stopping = True

    def serve(self, extra_fd: int | None = None) -> None:
        """Run until asked to stop; ``extra_fd`` closing (EOF) also stops an ephemeral hive."""
        poller = zmq.Poller()
        for sock in (self.front.sock, self.back.sock, self.xsub, self.xpub):
            poller.register(sock, zmq.POLLIN)
        if extra_fd is not None:
            poller.register(extra_fd, zmq.POLLIN)
        logger.info(
            "hive ready", node=self.node, router=self.front_endpoint, stream=self.stream_endpoint
        )
        try:
            while not self.stopping:
                events = dict(poller.poll(int(POLL_INTERVAL_S * 1000)))
                if self.xsub in events:
                    self._drain(self._on_stream)
                if self.xpub in events:
                    self._drain(self._on_subscription)
                if self.back.sock in events:
                    self._drain(self._on_back)
                if self.front.sock in events:
                    self._drain(self._on_front)
                if extra_fd is not None and extra_fd in events and not os.read(extra_fd, 4096):
                    logger.info("the keeper that started this ephemeral hive is gone")
                    self.stopping = True
                self.housekeeping(time.monotonic())
        finally:
            self.shutdown()

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
            handler(incoming.identity, rid, frame)
        except RbeeError as exc:
            self.front.reply_error(incoming.identity, rid, exc)
        except Exception as exc:  # a bug must not kill the daemon: answer and log it
            logger.exception("request failed", frame=frame.TYPE)
            self.front.reply_error(incoming.identity, rid, _internal(exc))

    # ------------------------------------------------------------------ keeper requests

    def on_hello(self, who: bytes, rid: int, frame: Hello) -> None:
        """Health and versions."""
        self.front.send(who, self._hello(), rid)

    def _hello(self) -> HelloReply:
        return HelloReply(
            node=self.node,
            rbee_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            pid=os.getpid(),
            stream_port=int(self.stream_endpoint.rsplit(":", 1)[1]),
            status="draining" if self.stopping else "ok",
        )

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
        )
        self.front.send(who, status, rid)

    def on_list_workers(self, who: bytes, rid: int, frame: ListWorkers) -> None:
        """The worker registry."""
        self.front.send(who, WorkerList(workers=self._worker_infos()), rid)

    def _worker_infos(self) -> list[Any]:
        infos = []
        for w in self.workers.values():
            try:
                rss = psutil.Process(w.pid).memory_info().rss
            except psutil.Error:
                rss = 0
            infos.append(w.info(rss))
        return infos

    def on_ensure_worker(self, who: bytes, rid: int, frame: EnsureWorker) -> None:
        """Reuse an idle worker holding the model, join one loading it, or spawn one."""
        entry = self.catalog.resolve(frame.model, allow_files=self.config.loopback_only)
        if self.catalog.get(entry.name) is not None:  # file: and synthetic: models have no row
            self.catalog.touch(entry.name)
        workers = list(self.workers.values())
        idle = pick_idle(workers, entry.path)
        if idle is not None:
            self.front.send(
                who,
                WorkerAssigned(worker_id=idle.worker_id, model=idle.model, reused=True, load_s=0),
                rid,
            )
            return
        loading = pick_loading(workers, entry.path)
        if loading is None:
            loading = self._spawn(entry.name, entry.path, frame.n_ctx or entry.context_length)
            message = f"spawned worker {loading.worker_id} (pid {loading.pid}) for {entry.name}"
        else:
            message = f"waiting for worker {loading.worker_id}, already loading {entry.name}"
        loading.waiters.append((who, rid))
        self.front.send(who, Progress(phase="spawn", message=message), rid)

    def _spawn(self, model: str, path: str, ctx_tokens: int) -> WorkerRecord:
        worker_id = "w-" + uuid.uuid4().hex[:8]
        n_ctx = min(ctx_tokens, DEFAULT_CTX_TOKENS) if ctx_tokens else DEFAULT_CTX_TOKENS
        proc = spawn_worker(worker_id, path, self.back_endpoint, self.xsub_endpoint, n_ctx)
        record = WorkerRecord(worker_id=worker_id, model=model, model_path=path, pid=proc.pid)
        self.workers[worker_id] = record
        self.procs[worker_id] = proc
        logger.info("spawned worker", worker=worker_id, model=model, pid=proc.pid)
        return record

    def on_start_job(self, who: bytes, rid: int, frame: StartJob) -> None:
        """Reserve the worker; dispatch once the keeper's subscription is seen."""
        worker = self.workers.get(frame.worker_id)
        if worker is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        if worker.state != "idle":
            raise AllSlotsBusy(f"worker {frame.worker_id} is {worker.state}")
        if frame.job_id in self.jobs:
            raise InvalidRequest(f"job id {frame.job_id} is already in use")
        worker.state, worker.job_id = "busy", frame.job_id
        worker.last_activity = time.time()
        job = JobRecord(
            job_id=frame.job_id,
            worker_id=worker.worker_id,
            keeper=who,
            params=frame.params,
            subscribe_deadline=time.monotonic() + SUBSCRIBE_TIMEOUT_S,
        )
        self.jobs[job.job_id] = job
        self.front.send(who, JobAccepted(job_id=job.job_id), rid)
        if self.subscribers[job.job_id] > 0:
            self._dispatch(job)

    def _dispatch(self, job: JobRecord) -> None:
        job.dispatched = True
        self.back.send(job.worker_id.encode(), RunJob(job_id=job.job_id, params=job.params))

    def on_cancel(self, who: bytes, rid: int, frame: Cancel) -> None:
        """Stop a job at its next token; canceling a finished job is harmless."""
        job = self.jobs.get(frame.job_id)
        if job is None:
            raise JobNotFound(f"no job {frame.job_id} on {self.node}")
        self._cancel(job)
        self.front.send(who, Ack(detail="finished" if job.finished else "canceling"), rid)

    def _cancel(self, job: JobRecord) -> None:
        if job.finished:
            return
        if job.dispatched:
            self.back.send(job.worker_id.encode(), CancelJob(job_id=job.job_id))
        else:
            self._finish(
                job,
                Done(
                    job_id=job.job_id,
                    seq=0,
                    tokens=0,
                    prompt_tokens=0,
                    ttft_s=0,
                    decode_s=0,
                    stop_reason="canceled",
                ),
            )

    def on_stop_worker(self, who: bytes, rid: int, frame: StopWorker) -> None:
        """Ask a worker to exit; the housekeeping escalates to TERM and KILL."""
        worker = self.workers.get(frame.worker_id)
        if worker is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        self._stop_worker(worker)
        self.front.send(who, Ack(detail=f"stopping {worker.worker_id}"), rid)

    def _stop_worker(self, worker: WorkerRecord) -> None:
        if worker.state == "stopping":
            return
        job = self.jobs.get(worker.job_id)
        if job is not None and not job.finished:
            self._cancel(job)
        worker.state = "stopping"
        worker.stop_deadline = time.monotonic() + STOP_GRACE_S
        self.back.send(worker.worker_id.encode(), StopRequest())

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
            self.xpub.send_multipart(parts, zmq.NOBLOCK)
        else:
            self._finish(job, frame, parts[1])

    def _finish(self, job: JobRecord, terminal: Frame, data: bytes | None = None) -> None:
        """Record and publish a job's one terminal frame; its worker becomes idle."""
        data = data if data is not None else encode(terminal)
        job.frames.append(data)
        job.finished_at = time.monotonic()
        # XPUB drops (never blocks) at its high-water mark; a keeper that missed it fetches it
        self.xpub.send_multipart([job.job_id.encode(), data], zmq.NOBLOCK)
        worker = self.workers.get(job.worker_id)
        if worker is not None and worker.job_id == job.job_id:
            worker.job_id = ""
            worker.last_activity = time.time()
            if worker.state == "busy":
                worker.state = "idle"

    def _on_subscription(self) -> None:
        data = self.xpub.recv(zmq.NOBLOCK)
        if not data:
            return
        topic = data[1:].decode("utf-8", "replace")
        if data[0] == 1:
            self.subscribers[topic] += 1
            job = self.jobs.get(topic)
            if job is not None and not job.dispatched and not job.finished:
                self._dispatch(job)
        elif data[0] == 0 and self.subscribers[topic] > 0:
            self.subscribers[topic] -= 1
            if self.subscribers[topic] == 0:
                del self.subscribers[topic]
                job = self.jobs.get(topic)
                if job is not None and job.dispatched and not job.finished:
                    logger.info("keeper went away; canceling its job", job=topic)
                    self._cancel(job)

    # ------------------------------------------------------------------ workers

    def _on_back(self) -> None:
        incoming = self.back.recv()
        if incoming is None:
            return
        frame = incoming.envelope.frame
        worker = self.workers.get(incoming.identity.decode("utf-8", "replace"))
        if worker is None:
            return
        now = time.monotonic()
        worker.last_seen = now
        if not worker.registered:
            worker.registered = True
            self._tell_waiters(worker, Progress(phase="registered", message=worker.worker_id))
        if isinstance(frame, WorkerLoading):
            worker.last_progress = now
            worker.loaded_fraction = frame.fraction
            self._tell_waiters(worker, Progress(phase="loading", done=frame.fraction, total=1.0))
        elif isinstance(frame, WorkerReady):
            worker.state = "idle"
            worker.load_s = frame.load_s
            worker.last_activity = time.time()
            logger.info("worker ready", worker=worker.worker_id, load_s=round(frame.load_s, 3))
            assigned = WorkerAssigned(
                worker_id=worker.worker_id, model=worker.model, reused=False, load_s=frame.load_s
            )
            self._tell_waiters(worker, assigned, final=True)
        elif isinstance(frame, WorkerFailed):
            self._fail_loading(worker, f"{frame.code}: {frame.message}", with_tail=False)
        elif isinstance(frame, Heartbeat):
            pass

    def _tell_waiters(self, worker: WorkerRecord, frame: Frame, final: bool = False) -> None:
        for who, rid in worker.waiters:
            self.front.send(who, frame, rid)
        if final:
            worker.waiters.clear()

    def _fail_loading(self, worker: WorkerRecord, reason: str, with_tail: bool = True) -> None:
        """Answer everyone waiting for a worker that will never be ready, and forget it."""
        proc = self.procs.get(worker.worker_id)
        if proc is not None and proc.proc.poll() is None:
            signal_worker(proc, signal.SIGKILL)
            proc.proc.wait(timeout=TERM_GRACE_S)
        tail = proc.stderr_tail() if proc is not None and with_tail else ""
        error = WorkerStartFailed(
            f"worker {worker.worker_id} for {worker.model} failed while loading: {reason}"
            + (f"\n--- last lines of its stderr ---\n{tail}" if tail else ""),
            suggestion="check the model file; `rbee models list` shows what is known",
        )
        for who, rid in worker.waiters:
            self.front.reply_error(who, rid, error)
        worker.waiters.clear()
        self._forget(worker)

    def _forget(self, worker: WorkerRecord) -> None:
        self.workers.pop(worker.worker_id, None)
        self.procs.pop(worker.worker_id, None)

    def housekeeping(self, now: float) -> None:
        """Reap exited workers, time out silent ones and unsubscribed jobs, trim old jobs."""
        for worker in list(self.workers.values()):
            proc = self.procs[worker.worker_id]
            code = proc.proc.poll()
            if code is not None:
                self._on_exit(worker, proc, code)
            elif worker.state == "stopping" and now > worker.stop_deadline:
                signal_worker(
                    proc,
                    signal.SIGTERM if now < worker.stop_deadline + TERM_GRACE_S else signal.SIGKILL,
                )
            elif worker.state == "loading" and now - worker.last_progress > LOAD_STALL_TIMEOUT_S:
                self._fail_loading(worker, f"no loading progress for {LOAD_STALL_TIMEOUT_S:.0f} s")
            elif worker.state != "loading" and now - worker.last_seen > HEARTBEAT_TIMEOUT_S:
                logger.warning("worker missed its heartbeats; killing it", worker=worker.worker_id)
                signal_worker(proc, signal.SIGKILL)
        for job in list(self.jobs.values()):
            if not job.dispatched and not job.finished and now > job.subscribe_deadline:
                self._finish(
                    job,
                    StreamError(
                        job_id=job.job_id,
                        seq=0,
                        code="TIMEOUT",
                        message=f"the keeper did not subscribe within {SUBSCRIBE_TIMEOUT_S:.0f} s",
                    ),
                )
        for job_id in expired_jobs(list(self.jobs.values()), now):
            del self.jobs[job_id]

    def _on_exit(self, worker: WorkerRecord, proc: WorkerProcess, code: int) -> None:
        if worker.state == "loading":
            self._fail_loading(worker, f"the process exited with code {code}")
            return
        job = self.jobs.get(worker.job_id)
        if job is not None and not job.finished:
            tail = proc.stderr_tail()
            self._finish(
                job,
                StreamError(
                    job_id=job.job_id,
                    seq=len(job.frames),
                    code=WorkerCrashed.code,
                    message=f"worker {worker.worker_id} exited with code {code} during the job"
                    + (f"; last output: {tail[-2000:]}" if tail else ""),
                ),
            )
        log_fn = logger.info if worker.state == "stopping" else logger.warning
        log_fn("worker exited", worker=worker.worker_id, code=code)
        self._forget(worker)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Stop every worker (ask, then TERM, then KILL) and close the sockets."""
        for worker in list(self.workers.values()):
            self._stop_worker(worker)
        deadline = time.monotonic() + STOP_GRACE_S
        for sig, until in (
            (None, deadline),
            (signal.SIGTERM, deadline + TERM_GRACE_S),
            (signal.SIGKILL, deadline + 2 * TERM_GRACE_S),
        ):
            alive = [p for p in self.procs.values() if p.proc.poll() is None]
            if not alive:
                break
            for proc in alive:
                if sig is not None:
                    signal_worker(proc, sig)
            for proc in alive:
                with contextlib.suppress(Exception):
                    proc.proc.wait(timeout=max(0.0, until - time.monotonic()))
        for sock in (self.front.sock, self.back.sock, self.xsub, self.xpub):
            sock.close(0)
        self.ctx.term()
        self.catalog.close()
        logger.info("hive stopped", node=self.node)


def _internal(exc: Exception) -> RbeeError:
    from rbee.errors import InternalError

    return InternalError(f"{type(exc).__name__}: {exc}")
