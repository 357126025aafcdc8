"""The hive's jobs: a bounded FIFO queue in front of the workers' slots, dispatch to a free slot
once the keeper's subscription is seen, and the relay that keeps every stream frame for
gap-filling fetches. A job that ends frees its slot, and the next queued job takes it at once.

Each job belongs to the key that started it: only that key hears its stream (rbee.hive.streams),
fetches its frames or sees its id; an admin key may cancel it, and the owner is told so. The desk
owns the jobs, the queue and the stream sockets' traffic; it asks the provisioner for models and
new workers and the pool for the workers it dispatches to."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import zmq

from rbee import log
from rbee.errors import (
    AllSlotsBusy,
    Canceled,
    HiveDraining,
    InvalidRequest,
    JobNotFound,
    JobStopped,
    ModelNotFound,
    RbeeError,
    WorkerCrashed,
    WorkerNotFound,
)
from rbee.gpu import where_text
from rbee.hive.metrics import HiveMetrics
from rbee.hive.pool import SIGNAL_HINT, Event, WorkerPool, lender_lost
from rbee.hive.provision import NeedsPull, Provisioner, slot_context
from rbee.hive.registry import (
    JobRecord,
    WorkerRecord,
    expired_jobs,
    pick_free,
    waiting_for_slots,
)
from rbee.hive.request import Replies, Request
from rbee.hive.settings import RETRY_AFTER_S, HiveConfig
from rbee.hive.streams import StreamGate
from rbee.llamacpp import package_version
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    DEFAULT_CTX_TOKENS,
    KEEP_ALIVE_DEFAULT,
    RECENT_ERRORS,
    Ack,
    Cancel,
    CancelJob,
    Done,
    FetchFrames,
    Frame,
    FramesReply,
    JobAccepted,
    JobError,
    Progress,
    RunJob,
    StartJob,
    StreamError,
    Token,
    stream_topic,
)
from rbee.transport.keys import fingerprint

SUBSCRIBE_TIMEOUT_S = 4.0  # under the keeper's wait (tests/unit/test_timing.py)
QUEUE_TOLD_EVERY_S = 1.0  # a queued keeper hears its position at least this often
QUEUE_WAIT_S = 300.0
MAX_FRAMES_PER_REPLY = 8192

logger = log.get(__name__)


def engine_text(setting: str) -> str:
    """The llama.cpp build a receipt names: llama-cpp-python's version and how it runs here."""
    version = package_version()
    return (f"llama-cpp-python {version}, {setting}" if version else setting)[:1024]


class JobDesk:
    """The hive's jobs: the queue, dispatch, and the relay of their streams."""

    def __init__(
        self,
        config: HiveConfig,
        node: str,
        pool: WorkerPool,
        provisioner: Provisioner,
        replies: Replies,
        streams: tuple[zmq.Socket[bytes], zmq.Socket[bytes]],
        draining: Callable[[], bool],
        metrics: HiveMetrics | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.metrics = metrics or HiveMetrics(node)  # counted at each job's end
        self.pool = pool
        self.provisioner = provisioner
        self.replies = replies
        self.xsub, self.xpub = streams  # workers' frames in; keepers' subscriptions and frames
        self.draining = draining
        self.secure = config.secure or not config.loopback_only
        self.jobs: dict[str, JobRecord] = {}
        self.queue: list[JobRecord] = []  # FIFO of jobs waiting for a slot or a subscription
        self.gate = StreamGate()
        self.errors: deque[JobError] = deque(maxlen=RECENT_ERRORS)  # failed jobs, latest last
        self.dropped_stream_frames = 0

    def running(self) -> list[JobRecord]:
        """The jobs a worker is running now."""
        return [j for j in self.jobs.values() if j.dispatched and not j.finished]

    def shown_to(self, request: Request, job_id: str) -> bool:
        """Whether ``request`` may see the id of job ``job_id`` (its owner and admins may)."""
        job = self.jobs.get(job_id)
        return request.admin or (job is not None and job.owner == request.key)

    def on_start_job(self, request: Request, frame: StartJob) -> None:
        """Queue the job; it starts in a free slot of a worker holding the model once the
        keeper's subscription is seen. The final reply (JobAccepted) comes when it starts.
        ALL_SLOTS_BUSY only when no slot is free for it and ``max_queue`` jobs already wait
        for one."""
        if frame.job_id in self.jobs or self.gate.owner(frame.job_id) not in (None, request.key):
            raise InvalidRequest(f"job id {frame.job_id} is already in use")
        preferred = self.pool.workers.get(frame.worker_id)
        if frame.worker_id and preferred is None:
            raise WorkerNotFound(f"no worker {frame.worker_id} on {self.node}")
        if preferred is not None:
            model, path = preferred.model, preferred.model_path
            if self.draining():
                raise HiveDraining(f"hive {self.node} is shutting down")
            # what made it the choice for a request naming no context is enough for this one
            n_ctx = min(preferred.n_ctx, DEFAULT_CTX_TOKENS)
            if frame.n_ctx:
                n_ctx = self._context(frame.model, frame.n_ctx)
        else:
            try:
                entry = self.provisioner.resolve(frame.model)
            except NeedsPull as need:
                raise ModelNotFound(
                    f"{need.reference} is not downloaded on {self.node} yet",
                    suggestion=f"`rbee models pull {need.reference}` (or run it with rbee infer)",
                ) from None
            model, path = entry.name, entry.path
            n_ctx = slot_context(entry.context_length, frame.n_ctx)
        keep_alive = frame.keep_alive_s
        job = JobRecord(
            job_id=frame.job_id,
            model=model,
            model_path=path,
            request=request,
            params=frame.params,
            keep_alive_s=self.config.keep_alive_s
            if keep_alive == KEEP_ALIVE_DEFAULT
            else keep_alive,
            preferred_worker=frame.worker_id,
            backend=preferred.backend if preferred is not None else "",
            device=preferred.device if preferred is not None else "",
            n_ctx=n_ctx,
        )
        waiting = waiting_for_slots([*self.queue, job], self.pool.records())
        if len(waiting) > self.config.limits.max_queue:
            raise AllSlotsBusy(
                f"every slot of {self.node} for {model} is busy and its queue is full "
                f"({len(waiting) - 1} jobs waiting)",
                retry_after_s=RETRY_AFTER_S,
                suggestion="try again shortly",
            )
        self.gate.claim(frame.job_id, request.key)
        self.jobs[job.job_id] = job
        self.queue.append(job)
        logger.info("job queued", job=job.job_id, model=model, waiting=len(self.queue))
        self.schedule(time.monotonic())

    def _context(self, model: str, n_ctx: int) -> int:
        """The context per slot a job asking for ``n_ctx`` needs: the provisioner's answer
        (cut to what the model was trained on), as its EnsureWorker got."""
        try:
            return slot_context(self.provisioner.resolve(model).context_length, n_ctx)
        except NeedsPull:  # its worker is here, so the model is: never, but not a reason to fail
            return n_ctx

    def schedule(self, now: float) -> None:
        """Start queued jobs in free slots (FIFO per model); keep waiting keepers informed."""
        for job in list(self.queue):
            if not self.gate.listeners(job.job_id):
                if now - job.queued_at > SUBSCRIBE_TIMEOUT_S:
                    self.fail_queued(
                        job,
                        InvalidRequest(
                            f"the keeper did not subscribe to {job.job_id} within "
                            f"{SUBSCRIBE_TIMEOUT_S:.0f} s"
                        ),
                    )
                continue
            worker = pick_free(
                self.pool.records(), job.model_path, job.preferred_worker, serves=job.runs_on
            )
            if worker is not None:
                self._dispatch(job, worker)
            elif now - job.queued_at > QUEUE_WAIT_S:
                self.fail_queued(
                    job,
                    AllSlotsBusy(
                        f"waited {QUEUE_WAIT_S:.0f} s in the queue of {self.node}",
                        retry_after_s=RETRY_AFTER_S,
                    ),
                )
        self.provisioner.scale_for(self.queue)
        waiting = [j for j in self.queue if self.gate.listeners(j.job_id)]
        for position, job in enumerate(waiting, start=1):
            if position != job.told_position or now - job.told_at >= QUEUE_TOLD_EVERY_S:
                job.told_position, job.told_at = position, now
                note = f"position {position} of {len(waiting)}"
                queued = Progress(phase="queued", done=position, total=len(waiting), message=note)
                self.replies.send(job.request, queued)

    def _dispatch(self, job: JobRecord, worker: WorkerRecord) -> None:
        self.queue.remove(job)
        job.dispatched, job.worker_id = True, worker.worker_id
        worker.start_job(job.job_id, job.keep_alive_s)
        waited_ms = round((time.monotonic() - job.queued_at) * 1000)
        logger.info(
            "job started",
            job=job.job_id,
            worker=worker.worker_id,
            waited_ms=waited_ms,
            slots_busy=f"{len(worker.job_ids)}/{worker.slots}",
        )
        self.replies.send(job.request, self._accepted(job, worker, waited_ms / 1000))
        assert job.params is not None  # a queued job has them
        self.pool.send(worker, RunJob(job_id=job.job_id, params=job.params))
        job.params = None

    def _accepted(self, job: JobRecord, worker: WorkerRecord, queued_s: float) -> JobAccepted:
        """The answer to StartJob once a slot took the job, with what a receipt shows: this
        node, where the worker runs, the model's file (sha256, revision) and the engine."""
        entry = self.provisioner.catalog.get(worker.model)
        return JobAccepted(
            job_id=job.job_id,
            worker_id=worker.worker_id,
            node=self.node,
            where=where_text(worker),
            device_uuid=worker.device_uuid,
            model=worker.model,
            model_sha256=entry.sha256 if entry else "",
            model_revision=entry.revision if entry else "",
            engine=engine_text(self.pool.engine.describe()),
            queued_s=max(0.0, queued_s),
        )

    def note_error(self, model: str, code: str, message: str) -> None:
        """Keep a failed job for the status (`rbee top`'s LAST ERRORS)."""
        self.errors.append(JobError(at=time.time(), model=model, code=code, message=message[:256]))

    def fail_queued(self, job: JobRecord, error: RbeeError) -> None:
        """End a job that never started: its StartJob is answered with ``error``."""
        self.queue.remove(job)
        job.params = None
        logger.info("job failed", job=job.job_id, code=error.code, error=error.message)
        self.metrics.job_failed(job.model, error.code)
        self.note_error(job.model, error.code, error.message)
        self.replies.error(job.request, error)
        job.keep(
            encode(StreamError(job_id=job.job_id, seq=0, code=error.code, message=error.message))
        )
        job.finished_at = time.monotonic()

    def _own_job(self, request: Request, job_id: str, admin_may: bool = False) -> JobRecord:
        """The caller's job ``job_id`` (or anyone's, for an admin when ``admin_may``). Another
        key's job is answered exactly like a job that does not exist."""
        job = self.jobs.get(job_id)
        if job is None or (job.owner != request.key and not (admin_may and request.admin)):
            raise JobNotFound(f"no job {job_id} of this keeper on {self.node} (finished long ago?)")
        return job

    def on_cancel(self, request: Request, frame: Cancel) -> None:
        """Stop a job at its next token; canceling a finished job is harmless. An admin may
        cancel any key's job: the answer and the owner's stream say that an admin did."""
        job = self._own_job(request, frame.job_id, admin_may=True)
        detail = "finished" if job.finished else "canceling"
        if job.owner != request.key and not job.finished:
            by = request.describe()
            logger.warning(
                "admin canceled another key's job",
                job=job.job_id,
                by=by,
                owner=fingerprint(job.owner),
            )
            detail = f"canceling job {job.job_id} of key {fingerprint(job.owner)} as admin"
            self.cancel(job, by)
        else:
            self.cancel(job)
        self.replies.send(request, Ack(detail=detail))

    def cancel(self, job: JobRecord, by: str = "") -> None:
        """Stop ``job``; ``by`` names who, when it is not the job's own keeper."""
        if job.finished:
            return
        job.canceled_by = job.canceled_by or by
        if job.dispatched:
            worker = self.pool.workers.get(job.worker_id)
            if worker is not None:
                self.pool.send(worker, CancelJob(job_id=job.job_id))
        else:
            self.fail_queued(job, self._ended_by_other(job, "while queued"))

    def cancel_on(self, worker: WorkerRecord, by: str) -> None:
        """Stop every job ``worker`` runs (the worker is being stopped by ``by``)."""
        for job_id in list(worker.job_ids):
            job = self.jobs.get(job_id)
            if job is not None:
                self.cancel(job, by)

    def _ended_by_other(self, job: JobRecord, when: str) -> RbeeError:
        """JOB_STOPPED when the hive or an admin ended the job (its keeper says so and saves
        the partial text), CANCELED when its own keeper did."""
        if job.canceled_by:
            return JobStopped(
                f"job {job.job_id} was stopped by {job.canceled_by} on {self.node} {when}",
                suggestion="run it again (on another hive with --node, if this one is stopping)",
            )
        return Canceled(f"job {job.job_id} was canceled on {self.node} {when}")

    def on_fetch_frames(self, request: Request, frame: FetchFrames) -> None:
        """Resend a job's frames from a sequence number on (the gap-filling path)."""
        job = self._own_job(request, frame.job_id)
        end = min(len(job.frames), frame.from_seq + MAX_FRAMES_PER_REPLY)
        frames = job.frames[frame.from_seq : end]
        finished = job.finished and end == len(job.frames)
        self.replies.send(request, FramesReply(job_id=job.job_id, frames=frames, finished=finished))

    # ------------------------------------------------------------------ streams

    def on_stream(self) -> None:
        """One frame of a worker's stream: kept for the job and passed on to its keeper."""
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
            job.keep(parts[1])
            job.tokens += frame.count
            # Drops at the HWM; FetchFrames heals.
            self.xpub.send_multipart([stream_topic(job.job_id), parts[1]], zmq.NOBLOCK)
        elif isinstance(frame, Done) and frame.stop_reason == "canceled" and job.canceled_by:
            self._finish_canceled_by_other(job, frame)
        else:
            self._finish(job, frame, parts[1])

    def _finish_canceled_by_other(self, job: JobRecord, done: Done) -> None:
        """The owner learns that someone else (the hive, an admin) ended its job: the held-back
        tail comes as a last token, then a JOB_STOPPED error that says who."""
        if done.tail:
            tail = encode(Token(job_id=job.job_id, seq=done.seq, text=done.tail))
            job.keep(tail)
            self.xpub.send_multipart([stream_topic(job.job_id), tail], zmq.NOBLOCK)
        self._fail(job, self._ended_by_other(job, f"after {done.tokens} tokens"))

    def _fail(self, job: JobRecord, error: RbeeError) -> None:
        """End a dispatched job with ``error`` as its terminal frame (after every frame kept)."""
        terminal = StreamError(
            job_id=job.job_id,
            seq=len(job.frames),
            code=error.code,
            message=error.message[:16000],
            suggestion=error.suggestion[:2048],
        )
        self._finish(job, terminal)

    def _finish(self, job: JobRecord, terminal: Frame, data: bytes | None = None) -> None:
        """Record and publish a job's one terminal frame; its slot is free for the next job
        (its worker becomes idle with its last job)."""
        data = data if data is not None else encode(terminal)
        job.keep(data)
        job.finished_at = time.monotonic()
        self.xpub.send_multipart([stream_topic(job.job_id), data], zmq.NOBLOCK)
        if isinstance(terminal, Done):
            self.metrics.job_done(job.model, terminal)
            if (worker := self.pool.workers.get(job.worker_id)) is not None:
                worker.tokens_generated += terminal.tokens
            logger.info(
                "job finished",
                job=job.job_id,
                worker=job.worker_id,
                tokens=terminal.tokens,
                prompt_tokens=terminal.prompt_tokens,
                stop_reason=terminal.stop_reason,
                seconds=round(job.finished_at - job.queued_at, 3),
                ttft_ms=round(terminal.ttft_s * 1000, 1),  # the worker's: from taking the job
            )
        elif isinstance(terminal, StreamError):
            self.metrics.job_failed(job.model, terminal.code)
            self.note_error(job.model, terminal.code, terminal.message)
            logger.info(
                "job failed",
                job=job.job_id,
                worker=job.worker_id,
                code=terminal.code,
                error=terminal.message[:200],
            )
        worker = self.pool.workers.get(job.worker_id)
        if worker is not None:
            worker.end_job(job.job_id, time.monotonic())
        self.schedule(time.monotonic())

    def on_subscription(self) -> None:
        """A keeper (un)subscribed. The XPUB is manual: a subscription takes effect only when
        applied here, right after it is read, and only for the subscribing key's own job."""
        msg = self.xpub.recv(zmq.NOBLOCK, copy=False)
        data = msg.bytes
        if not data or data[0] not in (0, 1):
            return
        topic, key = data[1:], self._subscriber_key(msg)
        if data[0] == 1:
            job_id = self.gate.subscribe(topic, key or "")
            if not job_id:
                logger.info("refused a subscription", topic=topic[:80], key=fingerprint(key or ""))
                return
            self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
            if job_id in self.jobs:
                self.schedule(time.monotonic())
            return
        self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)  # an explicit one; harmless otherwise
        gone = self.gate.unsubscribe(topic, key)
        job = self.jobs.get(gone)
        if job is not None and not job.finished:
            logger.info("keeper went away; canceling its job", job=gone)
            self.cancel(job)

    def _subscriber_key(self, msg: zmq.Frame) -> str | None:
        """The CURVE key of whoever sent a subscription message ("" without CURVE; None for the
        unsubscriptions libzmq makes up when a connection closes)."""
        if not self.secure:
            return ""
        try:
            return str(msg.get("User-Id"))
        except zmq.ZMQError:
            return None

    def on_worker_gone(self, event: Event) -> None:
        """A worker process ended: every job it was running ends with WORKER_CRASHED (or
        JOB_STOPPED, when it was being stopped on purpose), after the frames it produced."""
        for job_id in list(event.worker.job_ids):
            job = self.jobs.get(job_id)
            if job is not None and not job.finished:
                self._end_on_exit(job, event)

    def _end_on_exit(self, job: JobRecord, event: Event) -> None:
        worker = event.worker
        if job.canceled_by:  # stopped on purpose before its Done came: not a crash
            self._fail(job, self._ended_by_other(job, f"after {job.tokens} tokens"))
            return
        if worker.lender_failure:  # llama.cpp aborts when a lender's link breaks
            self._fail(job, lender_lost(worker, f"during job {job.job_id}"))
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

    def forget_expired(self, now: float) -> None:
        """Drop finished jobs whose frames nobody will fetch any more."""
        for job_id in expired_jobs(list(self.jobs.values()), now):
            del self.jobs[job_id]
            self.gate.forget(job_id)
