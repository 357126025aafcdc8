"""One request's keeper work on a thread of its own, its events handed to the event loop.

ZeroMQ sockets belong to the thread that made them and the keeper's calls block, so each request
runs what `rbee infer` runs (connect, then the keeper's InferJob: worker, StartJob, stream, with
its retries) on its own thread with its own sockets, sharing only the gateway's zmq.Context.
Events go to an asyncio queue through ``call_soon_threadsafe``; the HTTP side never touches a
socket. Once a worker has taken the job, its tokens are read on the event loop itself
(rbee.gateway.relay: the thread lends its SUB socket and waits), so a token wakes one thread,
not two.

The HTTP side stops a job by setting ``stop`` (the client went away). The keeper's job looks at
it (and at the ready deadline) in every wait, a download's or a loading worker's too, and then
closes its SUB socket (the hive cancels a job whose subscriber left) and sends Cancel, so the
worker is free for the next request; a download goes on for whoever else waits for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import zmq

from rbee import log
from rbee.errors import AllSlotsBusy, Canceled, InternalError, RbeeError, Timeout
from rbee.gateway.relay import LoopReader
from rbee.keeper import receipt as receipts
from rbee.keeper.connect import connect
from rbee.keeper.job import (
    STOP_CHECK_S,
    Deadline,
    Failed,
    Finished,
    InferJob,
    InferRequest,
    JobEvent,
    Started,
    Text,
)
from rbee.keeper.link import HiveLink
from rbee.keeper.stream import JobStream, StreamFrame
from rbee.protocol.messages import Done, JobAccepted, new_job_id
from rbee.transport.sockets import StreamSubscriber

READY_TIMEOUT_S = 600.0  # finding a hive, downloading and loading the model, and queueing
MAX_JOBS_IN_FLIGHT = 256  # a thread and two sockets each; beyond this, clients are told to retry
JOIN_TIMEOUT_S = 10.0  # a stopped job notices within 0.2 s, then waits for Cancel's answer (2 s)

logger = log.get(__name__)


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
        self.job_id = new_job_id()  # the first attempt's, and the response's id
        self.stop = threading.Event()
        self.ended = False  # set by the reader once it saw the terminal event
        self.where: dict[str, str] = {"job_id": self.job_id}
        self.accepted: JobAccepted | None = None  # the hive's answer once a slot took it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._ready: Deadline | None = None  # a worker takes the job by then, or it fails
        self._thread = threading.Thread(target=self._run, name=self.job_id, daemon=True)

    def start(self) -> None:
        """Run the job; call from the event loop that will read its events."""
        self._loop = asyncio.get_running_loop()
        self._ready = Deadline.after(self.ready_timeout_s)
        self._thread.start()

    async def next(self, timeout_s: float) -> JobEvent | None:
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

    def receipt(self, done: Done | None = None) -> dict[str, Any] | None:
        """What served the answer (rbee.keeper.receipt), once a worker took it."""
        if self.accepted is None:
            return None
        return receipts.receipt(self.accepted, self.request.params, done)

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

    def emit(self, event: JobEvent) -> None:
        """Hand an event to the loop (a loop already gone stops the job)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            self.stop.set()

    def _run(self) -> None:
        link: HiveLink | None = None
        try:
            request = self.request
            link = connect(self.ctx, request.node, request.model, request.backend, request.device)
            self.where["node"] = link.hello.node
            for note in link.notes:
                logger.info("route", job=self.job_id, note=note)
            job = InferJob(
                link, request, self.stop.is_set, self._ready, self.job_id, lend=self._lend
            )
            for event in job.events():
                self._forward(event)
        except RbeeError as exc:  # connect's: the job's own failures are events
            self.emit(Failed(exc))
        except Exception as exc:  # a bug must reach the client as a 500, not hang it
            logger.exception("job failed", job=self.job_id)
            self.emit(Failed(InternalError.of(exc)))
        finally:
            if link is not None:
                link.close()

    def _lend(self, sub: StreamSubscriber, stream: JobStream) -> StreamFrame | None:
        """Let the event loop read the job's tokens (see rbee.gateway.relay)."""
        assert self._loop is not None
        reader = LoopReader(self._loop, sub, stream, self._events.put_nowait)
        return reader.run(self.stop, STOP_CHECK_S)

    def _forward(self, event: JobEvent) -> None:
        """Pass an event on to the HTTP side, noting where the job runs (empty text, held back
        for a stop sequence, is no chunk)."""
        if isinstance(event, Started):
            self.where.update(job_id=event.job_id, worker_id=event.worker_id)
            self.accepted = event.accepted
        elif isinstance(event, Text) and not event.text and not event.probs:
            return
        elif isinstance(event, Failed) and isinstance(event.error, Canceled | Timeout):
            logger.info("job canceled", job=self.job_id, reason=event.error.message)
        self.emit(event)


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
