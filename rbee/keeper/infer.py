"""`rbee infer`: the phases of one request, said on stderr, with the tokens on stdout.

hive (reach or start one) → preflight (versions) → worker (reuse an idle one, or spawn, register
and load it, with progress) → inference (stream) → summary (tokens, duration, tokens/s).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import zmq

from rbee.errors import (
    AllSlotsBusy,
    Canceled,
    HiveLost,
    HiveUnreachable,
    JobStopped,
    OutputFailed,
    RbeeError,
    WorkerCrashed,
    WorkerNotFound,
)
from rbee.keeper.connect import connect
from rbee.keeper.link import HiveLink
from rbee.keeper.stream import JobStream, describe
from rbee.paths import data_dir
from rbee.protocol.messages import (
    KEEP_ALIVE_DEFAULT,
    Cancel,
    Done,
    EnsureWorker,
    GenerateParams,
    JobAccepted,
    Progress,
    StartJob,
    StreamError,
    Token,
    WorkerAssigned,
    new_job_id,
)
from rbee.terminal import safe
from rbee.transport.sockets import STREAM_HWM, StreamSubscriber

WAIT_TIMEOUT_S = 5.0  # a waiting keeper hears from its hive every second (progress, queue)
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
    backend: str = "cpu"
    device: str = ""  # a GPU index or UUID for backend "cuda" ("": the hive picks)


@dataclass
class InferResult:
    """What happened, for the summary and for tests."""

    pieces: list[str] = field(default_factory=list)  # the text as it arrived (joined on demand)
    tokens: int = 0
    worker_id: str = ""
    reused: bool = False
    first_token_s: float = 0.0  # from the command's start to the first token's arrival
    stream_s: float = 0.0  # from the first token's arrival to the last one's
    total_s: float = 0.0
    done: Done | None = None

    @property
    def text(self) -> str:
        """Everything printed so far (``+=`` on a str would copy it all for every token)."""
        return "".join(self.pieces)


class Reporter:
    """Says each phase on stderr; loading progress is one updating line on a terminal."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.tty = err.isatty()
        self.last_step = -1

    def phase(self, name: str, text: str) -> None:
        """One line: ``[name] text``."""
        if self.last_step >= 0 and self.tty:
            self.err.write("\n")
        self.last_step = -1
        self.err.write(f"[{name}] {safe(text)}\n")
        self.err.flush()

    def download(self, done: float, total: float, detail: str) -> None:
        """Download progress: a live line on a terminal, a line per 10% otherwise."""
        pct = int(done * 100 / total) if total else 0
        step = pct if self.tty else pct // 10 * 10
        if step == self.last_step:
            return
        self.last_step = step
        line = f"[download] {pct:3d}% {done / 1e6:,.0f}/{total / 1e6:,.0f} MB, {detail}"
        self.err.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.err.flush()

    def loading(self, fraction: float) -> None:
        """Loading progress: a live percentage on a terminal, a line per quarter otherwise."""
        pct = int(fraction * 100)
        step = pct if self.tty else pct // 25 * 25
        if step == self.last_step:
            return
        self.last_step = step
        if self.tty:
            self.err.write(f"\r[loading] {pct:3d}%")
        else:
            self.err.write(f"[loading] {step}%\n")
        self.err.flush()


def run(request: InferRequest, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> InferResult:
    """Run one inference request end to end; raise an RbeeError on failure."""
    started = time.monotonic()
    report = Reporter(err)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    link: HiveLink | None = None
    try:
        link = connect(ctx, request.node, request.model, request.backend, request.device)
        for note in link.notes:
            report.phase("hive", note)
        hello = link.hello
        report.phase(
            "preflight",
            f"hive {hello.node} at {link.client.endpoint}: {hello.status} "
            f"(rbee {hello.rbee_version}, protocol {hello.protocol_version})",
        )
        result = InferResult()
        for attempt in range(BUSY_ATTEMPTS):
            job_id = new_job_id()
            # Subscribed before asking for a worker: the hive waits for the subscription before
            # it dispatches, and the connection is made while the worker is found.
            sub = StreamSubscriber(link.ctx, link.stream_endpoint, STREAM_HWM, link.curve)
            sub.subscribe(job_id)
            try:
                assigned = worker_for(link, request, report)
                result.worker_id, result.reused = assigned.worker_id, assigned.reused
                stream_job(link, request, assigned, result, report, out, started, sub, job_id)
                break
            except WorkerNotFound:
                if attempt + 1 == BUSY_ATTEMPTS:
                    raise  # the idle worker seen a moment ago is gone: ask the hive for one
            except AllSlotsBusy as busy:
                if attempt + 1 == BUSY_ATTEMPTS:
                    raise
                wait = max(busy.retry_after_s, BUSY_BACKOFF_S * 2**attempt)
                report.phase("busy", f"{busy.message}; retrying in {wait:.1f} s")
                time.sleep(wait)
            finally:
                sub.close()
        result.total_s = time.monotonic() - started
        summarize(result, report)
        return result
    except HiveUnreachable as exc:
        if link is None:
            raise
        raise link.lost(exc) from None
    finally:
        if link is not None:
            link.close()
        ctx.destroy(linger=0)  # never waits on a socket an error path left open


def worker_for(link: HiveLink, request: InferRequest, report: Reporter) -> WorkerAssigned:
    """The worker for this request: an idle one the hive's status showed while the keeper chose
    it (StartJob goes to it with no EnsureWorker round trip), else whatever EnsureWorker gives.
    The status is used once: a retry asks the hive."""
    status, link.status = link.status, None
    for w in status.workers if status is not None else []:
        if (
            w.model == request.model
            and w.state == "idle"
            and w.backend == request.backend
            and request.device in ("", w.device)
        ):
            report.phase("worker", f"reusing idle worker {w.worker_id} ({w.model})")
            return WorkerAssigned(worker_id=w.worker_id, model=w.model, reused=True, load_s=0.0)
    return ensure_worker(link, request.model, report, request.backend, request.device)


def ensure_worker(
    link: HiveLink, model: str, report: Reporter, backend: str = "cpu", device: str = ""
) -> WorkerAssigned:
    """Phases reuse/spawn, registration and loading: get a worker holding the model, on the
    backend (and GPU) asked for."""
    rid = link.client.send(EnsureWorker(model=model, backend=backend, device=device))
    for frame in link.client.replies(rid, WAIT_TIMEOUT_S):
        if isinstance(frame, Progress):
            if frame.phase == "loading":
                report.loading(frame.done / frame.total if frame.total else 0.0)
            elif frame.phase == "download" and frame.total:
                report.download(frame.done, frame.total, frame.message)
            elif frame.phase == "download":
                report.phase("download", f"pulling {frame.message}")
            else:
                report.phase("worker" if frame.phase == "spawn" else frame.phase, frame.message)
        elif isinstance(frame, WorkerAssigned):
            if frame.busy:
                report.phase("worker", f"worker {frame.worker_id} ({frame.model}) is busy")
            elif frame.reused:
                report.phase("worker", f"reusing idle worker {frame.worker_id} ({frame.model})")
            else:
                report.phase(
                    "ready",
                    f"worker {frame.worker_id} loaded {frame.model} in {frame.load_s:.2f} s",
                )
            return frame
    raise AssertionError("replies() ends only by raising")  # pragma: no cover


def start_job(
    link: HiveLink, request: InferRequest, assigned: WorkerAssigned, job_id: str, report: Reporter
) -> str:
    """Send StartJob and wait, showing the queue position, until a worker takes the job."""
    start = StartJob(
        job_id=job_id,
        model=request.model,
        params=request.params,
        worker_id=assigned.worker_id,
        keep_alive_s=request.keep_alive_s,
    )
    rid = link.client.send(start)
    said = ""
    for frame in link.client.replies(rid, WAIT_TIMEOUT_S):
        if isinstance(frame, Progress) and frame.phase == "queued":
            if frame.message != said:  # the hive repeats it every second: say what changed
                report.phase("queue", f"waiting for a free worker: {frame.message}")
                said = frame.message
        elif isinstance(frame, JobAccepted):
            return frame.worker_id
    raise AssertionError("replies() ends only by raising")  # pragma: no cover


def stream_job(
    link: HiveLink,
    request: InferRequest,
    assigned: WorkerAssigned,
    result: InferResult,
    report: Reporter,
    out: TextIO,
    started: float,
    sub: StreamSubscriber,
    job_id: str,
) -> None:
    """Start the job (``sub`` already subscribed to ``job_id``), print tokens as they come;
    Ctrl-C cancels the job."""
    try:
        try:
            worker_id = start_job(link, request, assigned, job_id, report)
            result.worker_id = worker_id
            report.phase("inference", f"job {job_id} on worker {worker_id}")
            for frame in JobStream(link.client, sub, job_id):
                if isinstance(frame, Token):
                    now = time.monotonic()
                    if not result.tokens:
                        result.first_token_s = now - started
                    result.stream_s = now - started - result.first_token_s
                    result.tokens += 1
                    emit(out, frame.text, result, flush=not sub.has_pending())
                elif isinstance(frame, Done):
                    emit(out, frame.tail, result)
                    result.done = frame
                    if frame.stop_reason == "canceled":  # not by us: we would not be here
                        stopped = JobStopped(f"job {job_id} was stopped on the hive")
                        raise with_partial(stopped, result, request.params.max_tokens, job_id)
                elif isinstance(frame, StreamError):
                    raise stream_failed(frame, result, request.params.max_tokens, job_id)
        except KeyboardInterrupt:
            cancel(link, job_id)
            raise Canceled(f"canceled after {result.tokens} tokens") from None
        except OutputFailed:
            cancel(link, job_id)  # nobody reads the rest
            raise
        except (HiveLost, HiveUnreachable) as exc:
            lost = exc if isinstance(exc, HiveLost) else link.lost(exc)
            raise with_partial(lost, result, request.params.max_tokens, job_id) from None
    finally:
        if result.pieces and not result.pieces[-1].endswith("\n"):
            out.write("\n")
        out.flush()


def stream_failed(frame: StreamError, result: InferResult, asked: int, job_id: str) -> RbeeError:
    """The error for a stream that ended badly; partial text is saved so nothing is lost."""
    return with_partial(describe(frame), result, asked, job_id)


def with_partial(error: RbeeError, result: InferResult, asked: int, job_id: str) -> RbeeError:
    """``error``, its message saying where the partial text was saved (when any came)."""
    if result.text:
        path = data_dir() / "partial" / f"{job_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.text)
        error.message += (
            f"\n{result.tokens} of {asked} tokens arrived; the partial text is saved in {path}"
        )
    elif isinstance(error, WorkerCrashed):
        error.message += f"\nno token of the {asked} asked for arrived"
    return error


def emit(out: TextIO, text: str, result: InferResult, flush: bool = True) -> None:
    """Print text as it arrives; ``flush=False`` when more is already waiting (the flush then
    comes with the last of it: one write for a burst instead of one per token)."""
    if text:
        out.write(text)
        if flush:
            out.flush()
        result.pieces.append(text)


def cancel(link: HiveLink, job_id: str) -> None:
    """Best-effort cancel (the hive also cancels when our subscription goes away)."""
    with contextlib.suppress(RbeeError):
        link.client.request(Cancel(job_id=job_id), CANCEL_TIMEOUT_S)


def summarize(result: InferResult, report: Reporter) -> None:
    """The closing line, measured where the person sits (on arrival, not at the worker).

    tokens/s counts the tokens after the first over the time they took to arrive, like
    llama.cpp's and Ollama's eval rate (the first token's wait is reported on its own).
    """
    done = result.done
    if done is None:
        return
    rate = (result.tokens - 1) / result.stream_s if result.stream_s > 0 else 0.0
    report.phase(
        "done",
        f"{result.tokens} tokens in {result.stream_s:.2f} s ({rate:.1f} tokens/s); "
        f"first token after {result.first_token_s * 1000:.0f} ms; "
        f"prompt {done.prompt_tokens} tokens; stop: {done.stop_reason}; "
        f"total {result.total_s:.2f} s",
    )
