"""One inference request on a hive already reached, as typed events: what `rbee infer` prints
and what `rbee serve` forwards, from one loop.

``InferJob(link, request).events()`` runs the phases after preflight: a worker (the idle one the
hive's status showed, else EnsureWorker: spawn, registration, download and loading progress),
StartJob (the queue position), then the token stream, ending with exactly one terminal event,
Finished or Failed. A worker gone since the status and ALL_SLOTS_BUSY (with backoff) are retried
here, so every caller retries alike.

The job watches for its own end: it looks at ``should_stop`` (and at the ``ready`` deadline,
until a worker takes the job) at least every STOP_CHECK_S of any wait, download and loading
included, and a job stopped that way, or abandoned by its reader (``close()`` on the events, an
exception such as Ctrl-C), is canceled on the hive: its subscription is closed (the hive cancels
a job whose subscriber left) and Cancel is sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from rbee.errors import (
    AllSlotsBusy,
    Canceled,
    HiveUnreachable,
    JobStopped,
    RbeeError,
    Timeout,
    WorkerNotFound,
)
from rbee.keeper.choose import has_free_slot
from rbee.keeper.link import HiveLink
from rbee.keeper.stream import JobStream, StreamFrame, describe
from rbee.protocol.messages import (
    DEFAULT_CTX_TOKENS,
    KEEP_ALIVE_DEFAULT,
    Cancel,
    Done,
    EnsureWorker,
    Frame,
    GenerateParams,
    JobAccepted,
    StartJob,
    StreamError,
    Token,
    TokenProb,
    WorkerAssigned,
    new_job_id,
)
from rbee.protocol.messages import Progress as ProgressFrame
from rbee.transport.sockets import STREAM_HWM, StreamSubscriber

WAIT_TIMEOUT_S = 5.0  # a waiting keeper hears from its hive every second (progress, queue)
STOP_CHECK_S = 0.2  # how soon a wait notices should_stop or the ready deadline
BUSY_ATTEMPTS = 5
BUSY_BACKOFF_S = 0.5
CANCEL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class InferRequest:
    """What the person asked for."""

    model: str
    params: GenerateParams
    node: str | None = None
    keep_alive_s: float = KEEP_ALIVE_DEFAULT
    backend: str = "auto"  # auto: the hive places it (GPU first); cpu; cuda: all on one GPU
    device: str = ""  # a GPU index or UUID for backend "cuda" ("": the hive picks)
    n_ctx: int = 0  # context per slot (0: the model's own, up to the hive's default)


@dataclass(frozen=True)
class Waiting:
    """A phase of getting a worker, said once: ``phase`` is worker, registered, download,
    ready, queue or busy (the names `rbee infer` prints in brackets)."""

    phase: str
    message: str


@dataclass(frozen=True)
class Progress:
    """How far a download (bytes) or the loading of the worker (a fraction of 1) has come."""

    kind: Literal["download", "loading"]
    done: float
    total: float
    detail: str = ""


@dataclass(frozen=True)
class Started:
    """A worker took the job; its text follows."""

    node: str
    worker_id: str
    job_id: str
    reused: bool  # the worker already held the model (no spawn, no load)
    accepted: JobAccepted | None = None  # the hive's answer: what a receipt says


@dataclass(frozen=True)
class Text:
    """Generated text: ``tokens`` tokens' worth (possibly empty: text held back for a stop
    sequence), or, with ``tokens`` 0, the held-back tail at the end."""

    text: str
    tokens: int = 1
    more: bool = False  # more is already waiting: a printer may flush with the last of it
    probs: tuple[TokenProb, ...] = ()  # the tokens' log probabilities, when asked for


@dataclass(frozen=True)
class Finished:
    """The job ended well; ``done`` has the totals and the stop reason."""

    done: Done


@dataclass(frozen=True)
class Failed:
    """The job could not be served or broke off (after any text that came)."""

    error: RbeeError


JobEvent = Waiting | Progress | Started | Text | Finished | Failed
# Hands a started job's subscription to another reader (the gateway's event loop) while its
# tokens come in order; returns the terminal frame it saw, or None: go on from the stream's
# ``next_seq`` (a gap, a silence, a stop).
Lend = Callable[[StreamSubscriber, JobStream], StreamFrame | None]


def never() -> bool:
    """A ``should_stop`` for a job that only its reader's exceptions end (the CLI's)."""
    return False


@dataclass(frozen=True)
class Deadline:
    """When a worker must have taken the job (``time.monotonic()``), and the wait it allows."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float) -> Deadline:
        """The deadline ``timeout_s`` from now."""
        return cls(time.monotonic() + timeout_s, timeout_s)


class InferJob:
    """One request's job on one hive; iterate ``events()`` once."""

    def __init__(
        self,
        link: HiveLink,
        request: InferRequest,
        should_stop: Callable[[], bool] = never,
        ready: Deadline | None = None,
        job_id: str = "",
        lend: Lend | None = None,
    ) -> None:
        self.link = link
        self.lend = lend
        self.request = request
        self.should_stop = should_stop
        self.ready = ready
        self.job_id = job_id or new_job_id()  # the attempt's: each retry gets a new one
        self.submitted = False  # StartJob went out: the hive holds a job, not just a wait
        self.waiting = True  # no worker took the job yet (the ready deadline applies)

    def events(self) -> Generator[JobEvent, None, None]:
        """The job's events, ending with Finished or Failed."""
        try:
            yield from self._attempts()
        except HiveUnreachable as exc:
            yield Failed(self.link.lost(exc))
        except RbeeError as exc:
            yield Failed(exc)

    # ------------------------------------------------------------------ the phases

    def _attempts(self) -> Iterator[JobEvent]:
        """Run the job; retry a worker gone since the status, and busy slots with backoff."""
        for attempt in range(1, BUSY_ATTEMPTS + 1):
            try:
                yield from self._attempt()
                return
            except (WorkerNotFound, AllSlotsBusy) as refused:
                if attempt == BUSY_ATTEMPTS:
                    raise
                self.job_id, self.submitted = new_job_id(), False  # the hive holds none of ours
                if isinstance(refused, AllSlotsBusy):  # WorkerNotFound: ask the hive for one
                    wait = max(refused.retry_after_s, BUSY_BACKOFF_S * 2 ** (attempt - 1))
                    yield Waiting("busy", f"{refused.message}; retrying in {wait:.1f} s")
                    self._sleep(wait)

    def _attempt(self) -> Iterator[JobEvent]:
        # Subscribed before asking for a worker: the hive waits for the subscription before it
        # dispatches, and the connection is made while the worker is found.
        link = self.link
        sub = StreamSubscriber(link.ctx, link.stream_endpoint, STREAM_HWM, link.curve)
        sub.subscribe(self.job_id)
        try:
            assigned = yield from self._worker()
            try:
                done = yield from self._run(assigned, sub)
            except (Canceled, Timeout, KeyboardInterrupt, GeneratorExit):
                sub.close()  # first: the hive cancels a job whose subscriber left
                self._cancel()  # and to be sure, it is told so
                raise
            yield Finished(done)
        finally:
            sub.close()

    def _worker(self) -> Generator[JobEvent, None, WorkerAssigned]:
        """The worker for this request: one with a free slot the hive's status showed while the
        keeper chose it (StartJob goes to it with no EnsureWorker round trip; if its slots fill
        meanwhile, the job queues there), else whatever EnsureWorker gives. The status is used
        once: a retry asks the hive."""
        status, self.link.status = self.link.status, None
        request = self.request
        for w in status.workers if status is not None else []:
            if (
                w.model == request.model
                and has_free_slot(w)
                and request.backend in ("auto", w.backend)
                and request.device in ("", w.device)
                and (w.n_ctx == 0 or w.n_ctx >= (request.n_ctx or DEFAULT_CTX_TOKENS))
            ):
                warm = WorkerAssigned(worker_id=w.worker_id, model=w.model, reused=True, load_s=0)
                yield assigned_event(warm)
                return warm
        return (yield from self._ensure_worker())

    def _ensure_worker(self) -> Generator[JobEvent, None, WorkerAssigned]:
        """Phases reuse/spawn, registration and loading (a Hub model downloads first): a
        worker holding the model, on the backend (and GPU) asked for."""
        request = self.request
        ensure = EnsureWorker(
            model=request.model,
            backend=request.backend,
            device=request.device,
            n_ctx=request.n_ctx,
        )
        for frame in self._replies(self.link.client.send(ensure)):
            if isinstance(frame, ProgressFrame):
                yield progress_event(frame)
            elif isinstance(frame, WorkerAssigned):
                yield assigned_event(frame)
                return frame
        raise AssertionError("_replies() ends only by raising")  # pragma: no cover

    def _start(self, assigned: WorkerAssigned) -> Generator[JobEvent, None, JobAccepted]:
        """Send StartJob and wait, saying the queue position, until a worker takes the job;
        the hive's answer (the worker, and what a receipt says)."""
        request = self.request
        start = StartJob(
            job_id=self.job_id,
            model=request.model,
            params=request.params,
            worker_id=assigned.worker_id,
            keep_alive_s=request.keep_alive_s,
            n_ctx=request.n_ctx,
        )
        self.submitted = True
        said = ""
        for frame in self._replies(self.link.client.send(start)):
            if isinstance(frame, ProgressFrame) and frame.phase == "queued":
                if frame.message != said:  # the hive repeats it every second: say what changed
                    yield Waiting("queue", f"waiting for a free slot: {frame.message}")
                    said = frame.message
            elif isinstance(frame, JobAccepted):
                return frame
        raise AssertionError("_replies() ends only by raising")  # pragma: no cover

    def _run(
        self, assigned: WorkerAssigned, sub: StreamSubscriber
    ) -> Generator[JobEvent, None, Done]:
        """Start the job (``sub`` already subscribed to it) and pass its text on; its Done."""
        accepted = yield from self._start(assigned)
        self.waiting = False
        node = self.link.hello.node
        yield Started(node, accepted.worker_id, self.job_id, assigned.reused, accepted)
        stream = JobStream(self.link.client, sub, self.job_id, self._check)
        frames: Iterable[StreamFrame] = stream
        if self.lend is not None:
            last = self.lend(sub, stream)  # its tokens went straight to the reader
            self._check()
            frames = [last] if last is not None else stream
        for frame in frames:
            self._check()
            if isinstance(frame, Token):
                yield Text(frame.text, frame.count, sub.has_pending(), tuple(frame.probs))
            elif isinstance(frame, Done):
                if frame.tail:
                    yield Text(frame.tail, tokens=0)
                if frame.stop_reason == "canceled":  # not by us: we would not be here
                    raise JobStopped(f"job {self.job_id} was stopped on the hive")
                return frame
            elif isinstance(frame, StreamError):
                raise describe(frame)
        raise AssertionError("JobStream ends with its terminal frame")  # pragma: no cover

    # ------------------------------------------------------------------ waiting, stopping

    def _check(self) -> None:
        """Raise Canceled when the job is no longer wanted, Timeout when no worker took it by
        the ready deadline."""
        if self.should_stop():
            raise Canceled(f"job {self.job_id} is no longer wanted")
        if self.waiting and self.ready is not None and time.monotonic() > self.ready.at:
            raise Timeout(
                f"{self.request.model} was not ready within {self.ready.timeout_s:g} s",
                suggestion="try again: the model may still be downloading or loading",
            )

    def _replies(self, rid: int) -> Iterator[Frame]:
        """The hive's frames answering ``rid``, each within WAIT_TIMEOUT_S of the last (else
        HiveUnreachable), the job's end looked at every STOP_CHECK_S meanwhile."""
        heard = time.monotonic()
        while True:
            self._check()
            try:
                frame = next(self.link.client.replies(rid, STOP_CHECK_S))
            except HiveUnreachable:
                if time.monotonic() - heard < WAIT_TIMEOUT_S:
                    continue
                raise HiveUnreachable(
                    f"no answer from {self.link.client.endpoint} within {WAIT_TIMEOUT_S:.1f} s",
                    suggestion="check that `rbee hive` runs there and the port is reachable",
                ) from None
            heard = time.monotonic()
            yield frame

    def _sleep(self, seconds: float) -> None:
        """Back off for ``seconds``, the job's end looked at meanwhile."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self._check()
            time.sleep(min(left, STOP_CHECK_S))

    def _cancel(self) -> None:
        """Best-effort cancel of a submitted job (the hive also cancels when our subscription
        goes away)."""
        if self.submitted:
            with contextlib.suppress(RbeeError):
                self.link.client.request(Cancel(job_id=self.job_id), CANCEL_TIMEOUT_S)


def progress_event(frame: ProgressFrame) -> Waiting | Progress:
    """The event a Progress frame of EnsureWorker stands for."""
    if frame.phase == "loading":
        return Progress("loading", frame.done, frame.total)
    if frame.phase == "download" and frame.total:
        return Progress("download", frame.done, frame.total, frame.message)
    if frame.phase == "download":
        return Waiting("download", f"pulling {frame.message}")
    return Waiting("worker" if frame.phase == "spawn" else frame.phase, frame.message)


def assigned_event(frame: WorkerAssigned) -> Waiting:
    """What EnsureWorker's answer says: a worker whose slots are all busy (the job will queue),
    a loaded one with a free slot, or one that just loaded."""
    named = f"worker {frame.worker_id} ({frame.model})"
    if frame.busy:
        return Waiting("worker", f"every slot of {named} is busy")
    if frame.reused:
        return Waiting("worker", f"reusing {named}: a slot is free")
    loaded = f"worker {frame.worker_id} loaded {frame.model} in {frame.load_s:.2f} s"
    return Waiting("ready", loaded)
