"""The hive's workers as processes: spawn, listen to, supervise, stop.

The pool turns what happens to worker processes (a frame on the local ROUTER, an exit, a silence)
into events for the server, which decides what they mean for keepers and jobs. It runs on the
hive's loop thread, like everything that touches a socket.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from rbee import log
from rbee.errors import (
    BackendUnavailable,
    LenderLost,
    LoadingTimeout,
    RbeeError,
    WorkerStartFailed,
)
from rbee.gpu import process_cpu_seconds
from rbee.hive.borrow import Tunnel
from rbee.hive.placement import Lender, Placement
from rbee.hive.registry import WorkerRecord
from rbee.hive.stall import STALL_S, StallWatch
from rbee.hive.supervisor import TERM_GRACE_S, WorkerProcess, signal_worker, spawn_worker
from rbee.llamacpp import CPU_VARIANT_ENV, EngineChoice
from rbee.protocol.messages import (
    STREAM_INTERVAL_MS,
    Frame,
    Heartbeat,
    StopRequest,
    WorkerFailed,
    WorkerLoading,
    WorkerReady,
)
from rbee.transport.sockets import RouterServer
from rbee.worker.args import WorkerArgs

TunnelFactory = Callable[[Lender, str, str], Tunnel]  # (lender, lease id, model) → a new link


def lender_lost(worker: WorkerRecord, when: str) -> LenderLost:
    """LENDER_LOST for a worker that ended because a link to lent memory broke."""
    return LenderLost(
        f"worker {worker.worker_id} ({worker.model} on {worker.where}) ended {when}: the "
        f"memory lent to it failed ({worker.lender_failure})",
        suggestion="try again: the model is placed anew with the hives in reach",
    )


HEARTBEAT_TIMEOUT_S = 5.0
LOOP_HELD_UP_S = 1.0  # the hive's loop checks its workers ten times a second
LOAD_STALL_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0

SIGNAL_HINT = (
    f"a fast path of llama.cpp may not work on this machine: restart the hive with "
    f"{CPU_VARIANT_ENV}=haswell (or x64) to use a lower CPU variant, and report the line above"
)

logger = log.get(__name__)


@dataclass(frozen=True)
class Event:
    """Something happened to a worker; ``kind`` says what."""

    kind: Literal["registered", "loading", "ready", "load_failed", "exited"]
    worker: WorkerRecord
    error: RbeeError | None = None
    exit_code: int = 0
    stderr_tail: str = ""


class WorkerPool:
    """Worker records and their processes, keyed by worker id."""

    def __init__(
        self,
        back: RouterServer,
        control: str,
        stream: str,
        engine: EngineChoice,
        stream_interval_ms: int = STREAM_INTERVAL_MS,
        tunnel: TunnelFactory | None = None,
        lender_stall_s: float = STALL_S,
    ) -> None:
        """``tunnel``: makes the link to a lender hive for a worker that borrows memory;
        ``lender_stall_s``: how long its lenders may make no progress while it runs a job."""
        self.stalls = StallWatch(lender_stall_s)
        self.back = back
        self.engine = engine  # how workers run llama.cpp here (the engine probe's verdict)
        self.stream_interval_ms = stream_interval_ms
        self.tunnel = tunnel
        self.control = control
        self.stream = stream
        self.workers: dict[str, WorkerRecord] = {}
        self.procs: dict[str, WorkerProcess] = {}
        self.reaped_at = 0.0

    def records(self) -> list[WorkerRecord]:
        """Every worker the hive knows, stopping ones included."""
        return list(self.workers.values())

    def spawn(
        self, model: str, path: str, n_ctx: int, where: Placement | None = None, slots: int = 1
    ) -> WorkerRecord:
        """Start a worker process for one model on one device (the CPU unless ``where`` says)
        with ``slots`` slots of ``n_ctx`` tokens each; it reports back on the local ROUTER."""
        where = where or Placement(backend="cpu", device="cpu")
        worker_id = "w-" + uuid.uuid4().hex[:8]
        tunnels = []
        if where.lenders:
            if self.tunnel is None:
                raise BackendUnavailable("this hive cannot borrow memory (it has no CURVE keys)")
            tunnels = [
                self.tunnel(lender, f"{worker_id}-{i}", model).start()
                for i, lender in enumerate(where.lenders)
            ]
        args = WorkerArgs(
            worker_id,
            path,
            self.control,
            self.stream,
            n_ctx,
            os.getpid(),
            backend=where.backend,
            device=where.device if where.backend == "cuda" else "",
            threads=self.engine.threads,
            extra_bufts=self.engine.extra_bufts,
            slots=slots,
            gpu_layers=where.gpu_layers,
            layers=where.layers,
            stream_interval_ms=self.stream_interval_ms,
            rpc=tuple(t.endpoint for t in tunnels),
        )
        proc = spawn_worker(args, where.uuid, self.engine.worker_env())
        record = WorkerRecord(
            worker_id=worker_id,
            model=model,
            model_path=path,
            pid=proc.pid,
            backend=where.backend,
            device=where.device,
            device_uuid=where.uuid,
            slots=slots,
            layers=where.layers if len(where.layers) > 1 or where.lenders else (),
            lenders=tuple(lender.node for lender in where.lenders),
            tunnels=tunnels,
            n_layers=where.n_layers if where.lenders else 0,
            n_ctx=n_ctx,
        )
        self.workers[worker_id] = record
        self.procs[worker_id] = proc
        logger.info(
            "worker spawned",
            worker=worker_id,
            model=model,
            pid=proc.pid,
            device=where.label,
            slots=slots,
        )
        return record

    def send(self, worker: WorkerRecord, frame: Frame) -> None:
        """Send a control frame to a worker."""
        self.back.send(worker.worker_id.encode(), frame)

    def stop(self, worker: WorkerRecord, reason: str) -> None:
        """Ask a worker to exit; ``reap`` escalates to SIGTERM and SIGKILL if it lingers."""
        if worker.state == "stopping":
            return
        logger.info("stopping worker", worker=worker.worker_id, reason=reason)
        worker.state = "stopping"
        worker.stop_deadline = time.monotonic() + STOP_GRACE_S
        self.send(worker, StopRequest())

    def on_frame(self, identity: bytes, frame: Frame, now: float) -> list[Event]:
        """A frame from a worker's DEALER; returns what it means (the first one registers)."""
        worker = self.workers.get(identity.decode("utf-8", "replace"))
        if worker is None:
            return []
        worker.last_seen = now
        events = [] if worker.registered else [Event("registered", worker)]
        worker.registered = True
        if isinstance(frame, WorkerLoading):
            worker.last_progress = now
            worker.loaded_fraction = frame.fraction
            events.append(Event("loading", worker))
        elif isinstance(frame, WorkerReady) and worker.state == "loading":
            worker.state, worker.load_s = "idle", frame.load_s
            worker.vram_bytes, worker.gpu_layers = frame.vram_bytes, frame.gpu_layers
            worker.n_layers = frame.n_layers
            worker.slots = min(worker.slots, frame.slots)  # never more than estimated for
            worker.n_ctx = frame.n_ctx or worker.n_ctx  # what llama.cpp gave each slot
            worker.last_activity = time.time()
            logger.info(
                "worker ready",
                worker=worker.worker_id,
                load_s=round(frame.load_s, 3),
                backend=frame.backend,
                device=frame.device,
                gpu_layers=frame.gpu_layers,
                rss_mib=frame.rss_bytes >> 20,
                vram_mib=frame.vram_bytes >> 20,
                estimate_mib=worker.estimate_bytes >> 20,
                slots=frame.slots,
            )
            events.append(Event("ready", worker))
        elif isinstance(frame, WorkerFailed):
            error = _start_failed(worker, f"{frame.code}: {frame.message}", "")
            self._give_up(worker)
            events.append(Event("load_failed", worker, error=error))
        elif not isinstance(frame, Heartbeat | WorkerReady):
            logger.warning(
                "unexpected frame from worker", worker=worker.worker_id, frame=frame.TYPE
            )
        return events

    def _give_up(self, worker: WorkerRecord) -> None:
        """A worker that failed: kill it; its exit is then routine (state "stopping")."""
        worker.state = "stopping"
        worker.stop_deadline = time.monotonic()
        self.kill(worker)

    def kill(self, worker: WorkerRecord) -> None:
        """SIGKILL a worker now (it failed or hung); ``reap`` reports its exit."""
        proc = self.procs.get(worker.worker_id)
        if proc is not None:
            signal_worker(proc, signal.SIGKILL)

    def reap(self, now: float) -> list[Event]:
        """Check every worker: exits, stalled loads, missed heartbeats, overdue stops.

        When the hive's own loop was held up (the last check is long past), the heartbeats
        that came meanwhile are still unread: the silence is the hive's, and no worker is
        blamed for it."""
        events: list[Event] = []
        held_up = now - self.reaped_at if self.reaped_at else 0.0
        self.reaped_at = now
        for worker in self.records():
            if held_up > LOOP_HELD_UP_S:
                worker.last_seen += held_up
                worker.last_progress += held_up
            proc = self.procs[worker.worker_id]
            code = proc.proc.poll()
            if code is not None:
                events.append(self._exited(worker, proc, code))
            elif worker.state == "stopping" and now > worker.stop_deadline:
                overdue = now > worker.stop_deadline + TERM_GRACE_S
                signal_worker(proc, signal.SIGKILL if overdue else signal.SIGTERM)
            elif worker.state == "loading" and now - worker.last_progress > LOAD_STALL_TIMEOUT_S:
                error = LoadingTimeout(
                    f"worker {worker.worker_id} made no loading progress for "
                    f"{LOAD_STALL_TIMEOUT_S:.0f} s (it got to {worker.loaded_fraction:.0%})",
                    suggestion="the disk may be slow or the model too large for this machine",
                )
                self._give_up(worker)
                events.append(Event("load_failed", worker, error=error))
            elif now - worker.last_seen > HEARTBEAT_TIMEOUT_S:
                logger.warning("worker missed its heartbeats; killing it", worker=worker.worker_id)
                self.kill(worker)
            elif worker.tunnels:
                self._watch_lenders(worker, proc, now)
        return events

    def _watch_lenders(self, worker: WorkerRecord, proc: WorkerProcess, now: float) -> None:
        """A worker stuck on a lender that hangs (rbee.hive.stall): its link fails with the
        reason, which its jobs' LENDER_LOST gives, and the worker is killed (it would wait
        forever); closing the link makes the lending hive kill the lender."""
        busy = worker.state == "busy"
        worker_cpu_s = (process_cpu_seconds(proc.proc.pid) or 0.0) if busy else 0.0
        links = [t.state() for t in worker.tunnels] if busy else []
        reason, blamed = self.stalls.check(worker.worker_id, busy, worker_cpu_s, links, now)
        if not reason:
            return
        logger.warning("lender stalled", worker=worker.worker_id, lenders=blamed, reason=reason)
        for tunnel in worker.tunnels:
            if tunnel.lender_name in blamed:
                tunnel.fail(reason)
        self.kill(worker)

    def _exited(self, worker: WorkerRecord, proc: WorkerProcess, code: int) -> Event:
        del self.workers[worker.worker_id]
        del self.procs[worker.worker_id]
        self.stalls.forget(worker.worker_id)
        for tunnel in worker.tunnels:  # its connections are gone: each tunnel ends at once
            tunnel.close()
        tail = proc.stderr_tail()
        log_at = logger.info if worker.state == "stopping" else logger.warning
        log_at("worker exited", worker=worker.worker_id, code=code, state=worker.state)
        error: RbeeError | None = None
        if worker.state == "loading" and worker.lender_failure:
            error = lender_lost(worker, "while it loaded")
        elif worker.state == "loading":
            reason = f"the process exited with code {code}"
            if code < 0:  # a signal: say what the engine ran, which is what a crash report needs
                reason += f" ({self.signal_death(code)})"
            error = _start_failed(worker, reason, tail, SIGNAL_HINT if code < 0 else "")
        return Event("exited", worker, error=error, exit_code=code, stderr_tail=tail)

    def signal_death(self, code: int) -> str:
        """``killed by SIGSEGV while the engine ran …``: what a person needs to report a crash."""
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        return f"killed by {name} while the engine ran {self.engine.describe()}"

    def alive(self) -> int:
        """How many worker processes still run."""
        return sum(1 for p in self.procs.values() if p.proc.poll() is None)


def _start_failed(
    worker: WorkerRecord, reason: str, tail: str, suggestion: str = ""
) -> WorkerStartFailed:
    return WorkerStartFailed(
        f"worker {worker.worker_id} for {worker.model} failed while loading: {reason}"
        + (f"\n--- last lines of its stderr ---\n{tail}" if tail else ""),
        suggestion=suggestion or "check the model file; `rbee models list` shows what is known",
    )
