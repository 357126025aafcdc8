"""One request's keeper work on a thread of its own, its events handed to the event loop.

ZeroMQ sockets belong to the thread that made them and the keeper's calls block, so each request
runs what `rbee infer` runs (connect → EnsureWorker → StartJob → JobStream) on its own thread with
its own sockets, sharing only the gateway's zmq.Context. Events go to an asyncio queue through
``call_soon_threadsafe``; the HTTP side never touches a socket.

The HTTP side stops a job by setting ``stop`` (the client went away). The thread looks at it on
every frame it receives: a waiting keeper hears from its hive at least every few seconds and a
streaming one on every token, so it then closes its SUB socket (the hive cancels a job whose
subscriber left) and sends Cancel, and the worker is free for the next request.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from dataclasses import dataclass

import zmq

from rbee import log
from rbee.errors import (
    AllSlotsBusy,
    Canceled,
    HiveLost,
    HiveUnreachable,
    InternalError,
    JobStopped,
    RbeeError,
    Timeout,
    WorkerNotFound,
)
from rbee.keeper.connect import connect
from rbee.keeper.infer import (
    InferRequest,
    Reporter,
    cancel,
    ensure_worker,
    start_job,
    worker_for,
)
from rbee.keeper.link import HiveLink
from rbee.keeper.stream import JobStream, describe
from rbee.protocol.messages import Done, StreamError, Token, WorkerAssigned, new_job_id
from rbee.transport.sockets import STREAM_HWM, StreamSubscriber

READY_TIMEOUT_S = 600.0  # finding a hive, downloading and loading the model, and queueing
MAX_JOBS_IN_FLIGHT = 256  # a thread and two sockets each; beyond this, clients are told to retry
JOIN_TIMEOUT_S = 10.0  # a stopped job's thread notices within a hive's progress interval (5 s)

logger = log.get(__name__)


@dataclass(frozen=True)
class Waiting:
    """The job is not running yet: a phase of finding a worker (spawn, loading, queue …)."""

    phase: str
    message: str


@dataclass(frozen=True)
class Started:
    """A worker took the job; tokens follow."""

    node: str
    worker_id: str


@dataclass(frozen=True)
class Text:
    """Generated text (one token's worth, or the held-back tail at the end)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The job ended well; ``done`` has the totals and the stop reason."""

    done: Done


@dataclass(frozen=True)
class Failed:
    """The job could not be served or broke off."""

    error: RbeeError


Event = Waiting | Started | Text | Finished | Failed


class _Reporter(Reporter):
    """The keeper's phase reporter, turned into events. It is called on every frame a waiting
    keeper receives, so it is also where a stopped request or a passed deadline cuts in."""

    def __init__(self, job: Job) -> None:
        super().__init__(io.StringIO())
        self.job = job

    def phase(self, name: str, text: str) -> None:
        """A phase of the wait, as an event."""
        self.job.check()
        self.job.emit(Waiting(name, text))

    def loading(self, fraction: float) -> None:
        """Loading progress, as an event."""
        self.phase("loading", f"{fraction:.0%}")


class Job:
    """One request to a worker: started on its own thread, read with ``next``."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        request: InferRequest,
        *,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.ctx = ctx
        self.request = request
        self.ready_timeout_s = ready_timeout_s
        self.job_id = new_job_id()
        self.stop = threading.Event()
        self.ended = False  # set by the reader once it saw the terminal event
        self.where: dict[str, str] = {"job_id": self.job_id}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._deadline = 0.0
        self._thread = threading.Thread(target=self._run, name=self.job_id, daemon=True)

    def start(self) -> None:
        """Run the job; call from the event loop that will read its events."""
        self._loop = asyncio.get_running_loop()
        self._deadline = time.monotonic() + self.ready_timeout_s
        self._thread.start()

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None when none came within ``timeout_s``."""
        if not self._events.empty():  # the common case while tokens flow: no timer task
            event = self._events.get_nowait()
        else:
            try:
                event = await asyncio.wait_for(self._events.get(), timeout_s)
            except TimeoutError:
                return None
        self.ended = self.ended or isinstance(event, Finished | Failed)
        return event

    def cancel(self) -> None:
        """Stop the job (the client went away); harmless once it ended."""
        if not self.ended:
            self.stop.set()

    def interrupt(self, error: RbeeError) -> None:
        """End the job's answer now with ``error`` and stop the job (call on the loop)."""
        self.cancel()
        self._events.put_nowait(Failed(error))

    @property
    def alive(self) -> bool:
        """Whether its thread still runs."""
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread; whether it ended."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ on the job's thread

    def emit(self, event: Event) -> None:
        """Hand an event to the loop (a loop already gone stops the job)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            self.stop.set()

    def check(self) -> None:
        """Raise when the request was stopped or the wait for a worker passed its deadline."""
        if self.stop.is_set():
            raise Canceled(f"job {self.job_id} is no longer wanted")
        if time.monotonic() > self._deadline:
            raise Timeout(
                f"{self.request.model} was not ready within {self.ready_timeout_s:g} s",
                suggestion="try again: the model may still be downloading or loading",
            )

    def _run(self) -> None:
        link: HiveLink | None = None
        try:
            request = self.request
            link = connect(self.ctx, request.node, request.model, request.backend, request.device)
            self.where["node"] = link.hello.node
            for note in link.notes:
                logger.info("route", job=self.job_id, note=note)
            self.check()
            try:
                self._stream(link, worker_for(link, request, _Reporter(self)))
            except WorkerNotFound:  # the idle worker the status showed is gone: ask the hive
                reporter = _Reporter(self)
                self._stream(
                    link,
                    ensure_worker(link, request.model, reporter, request.backend, request.device),
                )
        except HiveUnreachable as exc:
            lost = f"hive {link.hello.node} stopped answering: {exc.message}" if link else ""
            self.emit(Failed(HiveLost(lost) if link else exc))
        except RbeeError as exc:
            self.emit(Failed(exc))
        except Exception as exc:  # a bug must reach the client as a 500, not hang it
            logger.exception("job failed", job=self.job_id)
            self.emit(Failed(InternalError(f"{type(exc).__name__}: {exc}")))
        finally:
            if link is not None:
                link.close()

    def _stream(self, link: HiveLink, assigned: WorkerAssigned) -> None:
        """Subscribe, start the job, pass its frames on; a stop cancels it on the hive."""
        sub = StreamSubscriber(link.ctx, link.stream_endpoint, STREAM_HWM, link.curve)
        sub.subscribe(self.job_id)  # before StartJob: the hive waits for it
        try:
            worker_id = start_job(link, self.request, assigned, self.job_id, _Reporter(self))
            self.where["worker_id"] = worker_id
            self.emit(Started(link.hello.node, worker_id))
            for frame in JobStream(link.client, sub, self.job_id):
                if self.stop.is_set():
                    raise Canceled(f"job {self.job_id} is no longer wanted")
                if isinstance(frame, Token):
                    if frame.text:
                        self.emit(Text(frame.text))
                elif isinstance(frame, Done):
                    if frame.stop_reason == "canceled":  # not by us: the hive stopped it
                        raise JobStopped(f"job {self.job_id} was stopped on the hive")
                    if frame.tail:
                        self.emit(Text(frame.tail))
                    self.emit(Finished(frame))
                elif isinstance(frame, StreamError):
                    raise describe(frame)
        except (Canceled, Timeout) as exc:
            sub.close()  # first: the hive cancels a job whose subscriber left
            cancel(link, self.job_id)  # and to be sure, it is told so
            logger.info("job canceled", job=self.job_id, reason=exc.message)
            raise
        finally:
            sub.close()


class Jobs:
    """The jobs in flight, so that stopping the gateway stops them too."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], ready_timeout_s: float) -> None:
        self.ctx = ctx
        self.ready_timeout_s = ready_timeout_s
        self.running: set[Job] = set()

    def start(self, request: InferRequest) -> Job:
        """Start a job for ``request``; AllSlotsBusy when too many are in flight already."""
        self.running = {j for j in self.running if j.alive}
        if len(self.running) >= MAX_JOBS_IN_FLIGHT:
            raise AllSlotsBusy(
                f"the gateway has {len(self.running)} requests in flight",
                retry_after_s=1.0,
            )
        job = Job(self.ctx, request, ready_timeout_s=self.ready_timeout_s)
        self.running.add(job)
        job.start()
        return job

    def interrupt_all(self, error: RbeeError) -> None:
        """End every answer in flight with ``error`` (call on the loop)."""
        for job in self.running:
            if job.alive and not job.ended:
                job.interrupt(error)

    def stop_all(self, timeout_s: float = JOIN_TIMEOUT_S) -> int:
        """Stop every job and wait for their threads; how many did not end in time."""
        for job in self.running:
            job.stop.set()
        deadline = time.monotonic() + timeout_s
        left = [j for j in self.running if not j.join(max(0.0, deadline - time.monotonic()))]
        self.running.clear()
        return len(left)
