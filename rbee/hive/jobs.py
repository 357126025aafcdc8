"""The hive's jobs: a bounded FIFO queue in front of the workers, dispatch once the keeper's
subscription is seen, and the relay that keeps every stream frame for gap-filling fetches.

Each job belongs to the key that started it: only that key hears its stream (rbee.hive.streams),
fetches its frames or sees its id; an admin key may cancel it, and the owner is told so."""

from __future__ import annotations

import time

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
    WorkerNotFound,
)
from rbee.hive import placement
from rbee.hive.provision import NeedsPull
from rbee.hive.registry import JobRecord, WorkerRecord, pick_idle, plan_worker
from rbee.hive.settings import RETRY_AFTER_S, HiveState
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    KEEP_ALIVE_DEFAULT,
    Ack,
    Cancel,
    CancelJob,
    Done,
    FetchFrames,
    Frame,
    FramesReply,
    JobAccepted,
    Progress,
    RunJob,
    StartJob,
    StreamError,
    Token,
    stream_topic,
)
from rbee.transport.keys import fingerprint

SUBSCRIBE_TIMEOUT_S = 4.0  # under the keeper's 5 s wait for a reply
PROGRESS_EVERY_S = 1.0  # a waiting keeper hears from the hive at least this often
QUEUE_WAIT_S = 300.0
MAX_FRAMES_PER_REPLY = 8192

logger = log.get(__name__)


class JobDesk(HiveState):
    """The hive's job queue and stream relay (a part of ``Hive``)."""

    def on_start_job(self, who: bytes, rid: int, frame: StartJob) -> None:
        """Queue the job; it starts on an idle worker holding the model once the keeper's
        subscription is seen. The final reply (JobAccepted) comes when it starts."""
        if frame.job_id in self.jobs or self.streams.owner(frame.job_id) not in (None, self.caller):
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
        self.streams.claim(frame.job_id, self.caller)
        job = JobRecord(
            job_id=frame.job_id,
            model=model,
            model_path=path,
            keeper=who,
            owner=self.caller,
            rid=rid,
            params=frame.params,
            keep_alive_s=self.config.keep_alive_s
            if keep_alive == KEEP_ALIVE_DEFAULT
            else keep_alive,
            preferred_worker=frame.worker_id,
            backend=preferred.backend if preferred is not None else "",
            device=preferred.device if preferred is not None else "",
        )
        self.jobs[job.job_id] = job
        self.queue.append(job)
        logger.info("job queued", job=job.job_id, model=model, waiting=len(self.queue))
        self._schedule(time.monotonic())

    def _schedule(self, now: float) -> None:
        """Start queued jobs on idle workers (FIFO per model); keep waiting keepers informed."""
        for job in list(self.queue):
            if not self.streams.listeners(job.job_id):
                if now - job.queued_at > SUBSCRIBE_TIMEOUT_S:
                    self._fail_queued(
                        job,
                        InvalidRequest(
                            f"the keeper did not subscribe to {job.job_id} within "
                            f"{SUBSCRIBE_TIMEOUT_S:.0f} s"
                        ),
                    )
                continue
            worker = pick_idle(
                self.pool.records(), job.model_path, job.preferred_worker, serves=job.runs_on
            )
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
        waiting = [j for j in self.queue if self.streams.listeners(j.job_id)]
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
                if w.model_path == job.model_path
                and w.state in ("idle", "loading")
                and job.runs_on(w)
            ]
            if coming:
                continue
            try:
                entry = self.catalog.resolve(job.model, allow_files=self.config.loopback_only)
                where = self._place(job.backend or "cpu", job.device)
            except RbeeError:
                continue
            ctx = self._context(entry, 0)
            needed = placement.estimate_for_file(entry.path, ctx, where.backend)
            fits = needed.total_bytes <= where.free_bytes
            plan = plan_worker(records, job.model_path, self.config.limits, fits, job.runs_on)
            if plan.action == "spawn":
                if plan.evict is not None:
                    self.pool.stop(plan.evict, f"making room for {entry.name}")
                self._spawn(entry, 0, where, needed)

    def _dispatch(self, job: JobRecord, worker: WorkerRecord) -> None:
        self.queue.remove(job)
        job.dispatched, job.worker_id = True, worker.worker_id
        worker.state, worker.job_id = "busy", job.job_id
        worker.last_activity = time.time()
        waited_ms = round((time.monotonic() - job.queued_at) * 1000)
        logger.info("job started", job=job.job_id, worker=worker.worker_id, waited_ms=waited_ms)
        self.front.send(
            job.keeper, JobAccepted(job_id=job.job_id, worker_id=worker.worker_id), job.rid
        )
        assert job.params is not None  # a queued job has them
        self.pool.send(worker, RunJob(job_id=job.job_id, params=job.params))
        job.params = None

    def _fail_queued(self, job: JobRecord, error: RbeeError) -> None:
        self.queue.remove(job)
        job.params = None
        logger.info("job failed", job=job.job_id, code=error.code, error=error.message)
        self.front.reply_error(job.keeper, job.rid, error)
        job.keep(
            encode(StreamError(job_id=job.job_id, seq=0, code=error.code, message=error.message))
        )
        job.finished_at = time.monotonic()

    def _own_job(self, job_id: str, admin_may: bool = False) -> JobRecord:
        """The caller's job ``job_id`` (or anyone's, for an admin when ``admin_may``). Another
        key's job is answered exactly like a job that does not exist."""
        job = self.jobs.get(job_id)
        if job is None or (job.owner != self.caller and not (admin_may and self.role == "admin")):
            raise JobNotFound(f"no job {job_id} of this keeper on {self.node} (finished long ago?)")
        return job

    def on_cancel(self, who: bytes, rid: int, frame: Cancel) -> None:
        """Stop a job at its next token; canceling a finished job is harmless. An admin may
        cancel any key's job: the answer and the owner's stream say that an admin did."""
        job = self._own_job(frame.job_id, admin_may=True)
        detail = "finished" if job.finished else "canceling"
        if job.owner != self.caller and not job.finished:
            by = f"an admin key ({fingerprint(self.caller)})"
            logger.warning(
                "admin canceled another key's job",
                job=job.job_id,
                by=by,
                owner=fingerprint(job.owner),
            )
            detail = f"canceling job {job.job_id} of key {fingerprint(job.owner)} as admin"
            self._cancel(job, by)
        else:
            self._cancel(job)
        self.front.send(who, Ack(detail=detail), rid)

    def _cancel(self, job: JobRecord, by: str = "") -> None:
        """Stop ``job``; ``by`` names who, when it is not the job's own keeper."""
        if job.finished:
            return
        job.canceled_by = job.canceled_by or by
        if job.dispatched:
            worker = self.workers.get(job.worker_id)
            if worker is not None:
                self.pool.send(worker, CancelJob(job_id=job.job_id))
        else:
            self._fail_queued(job, self._ended_by_other(job, "while queued"))

    def _ended_by_other(self, job: JobRecord, when: str) -> RbeeError:
        """JOB_STOPPED when the hive or an admin ended the job (its keeper says so and saves
        the partial text), CANCELED when its own keeper did."""
        if job.canceled_by:
            return JobStopped(
                f"job {job.job_id} was stopped by {job.canceled_by} on {self.node} {when}",
                suggestion="run it again (on another hive with --node, if this one is stopping)",
            )
        return Canceled(f"job {job.job_id} was canceled on {self.node} {when}")

    def on_fetch_frames(self, who: bytes, rid: int, frame: FetchFrames) -> None:
        """Resend a job's frames from a sequence number on (the gap-filling path)."""
        job = self._own_job(frame.job_id)
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
            job.keep(parts[1])
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
        """Record and publish a job's one terminal frame; its worker becomes idle."""
        data = data if data is not None else encode(terminal)
        job.keep(data)
        job.finished_at = time.monotonic()
        self.xpub.send_multipart([stream_topic(job.job_id), data], zmq.NOBLOCK)
        if isinstance(terminal, Done):
            logger.info(
                "job finished",
                job=job.job_id,
                worker=job.worker_id,
                tokens=terminal.tokens,
                stop_reason=terminal.stop_reason,
                seconds=round(job.finished_at - job.queued_at, 3),
            )
        elif isinstance(terminal, StreamError):
            logger.info(
                "job failed",
                job=job.job_id,
                worker=job.worker_id,
                code=terminal.code,
                error=terminal.message[:200],
            )
        worker = self.workers.get(job.worker_id)
        if worker is not None and worker.job_id == job.job_id:
            worker.jobs_served += 1
            if worker.state == "busy":
                worker.became_idle(time.monotonic(), job.keep_alive_s)
            else:
                worker.job_id = ""
        self._schedule(time.monotonic())

    def _on_subscription(self) -> None:
        """A keeper (un)subscribed. The XPUB is manual: a subscription takes effect only when
        applied here, right after it is read, and only for the subscribing key's own job."""
        msg = self.xpub.recv(zmq.NOBLOCK, copy=False)
        data = msg.bytes
        if not data or data[0] not in (0, 1):
            return
        topic, key = data[1:], self._subscriber_key(msg)
        if data[0] == 1:
            job_id = self.streams.subscribe(topic, key or "")
            if not job_id:
                logger.info("refused a subscription", topic=topic[:80], key=fingerprint(key or ""))
                return
            self.xpub.setsockopt(zmq.SUBSCRIBE, topic)
            if job_id in self.jobs:
                self._schedule(time.monotonic())
            return
        self.xpub.setsockopt(zmq.UNSUBSCRIBE, topic)  # an explicit one; harmless otherwise
        gone = self.streams.unsubscribe(topic, key)
        job = self.jobs.get(gone)
        if job is not None and not job.finished:
            logger.info("keeper went away; canceling its job", job=gone)
            self._cancel(job)

    def _subscriber_key(self, msg: zmq.Frame) -> str | None:
        """The CURVE key of whoever sent a subscription message ("" without CURVE; None for the
        unsubscriptions libzmq makes up when a connection closes)."""
        if not self.secure:
            return ""
        try:
            return str(msg.get("User-Id"))
        except zmq.ZMQError:
            return None
