"""`rbee infer`: the phases of one request, said on stderr, with the tokens on stdout.

hive (reach or start one) → preflight (versions) → worker (reuse an idle one, or spawn, register
and load it, with progress) → inference (stream) → summary (tokens, duration, tokens/s).
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TextIO

import zmq

from rbee.errors import AllSlotsBusy, Canceled, RbeeError
from rbee.keeper.link import HiveLink, open_link
from rbee.keeper.stream import JobStream, describe
from rbee.protocol.messages import (
    Cancel,
    Done,
    EnsureWorker,
    GenerateParams,
    Progress,
    StartJob,
    StreamError,
    Token,
    WorkerAssigned,
)
from rbee.transport.sockets import STREAM_HWM, StreamSubscriber

LOAD_PROGRESS_TIMEOUT_S = 150.0  # the hive reports loading stalls sooner; this bounds a silent hive
REQUEST_TIMEOUT_S = 5.0
START_ATTEMPTS = 3
CANCEL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class InferRequest:
    """What the person asked for."""

    model: str
    params: GenerateParams
    node: str | None = None


@dataclass
class InferResult:
    """What happened, for the summary and for tests."""

    text: str = ""
    tokens: int = 0
    worker_id: str = ""
    reused: bool = False
    first_token_s: float = 0.0
    total_s: float = 0.0
    done: Done | None = None


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
        self.err.write(f"[{name}] {text}\n")
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
        link = open_link(ctx, request.node)
        for note in link.notes:
            report.phase("hive", note)
        hello = link.hello
        report.phase(
            "preflight",
            f"hive {hello.node} at {link.client.endpoint}: {hello.status} "
            f"(rbee {hello.rbee_version}, protocol {hello.protocol_version})",
        )
        result = InferResult()
        for attempt in range(START_ATTEMPTS):
            assigned = ensure_worker(link, request.model, report)
            result.worker_id, result.reused = assigned.worker_id, assigned.reused
            try:
                stream_job(link, assigned.worker_id, request.params, result, report, out, started)
                break
            except AllSlotsBusy:
                if attempt + 1 == START_ATTEMPTS:
                    raise
                report.phase("worker", f"worker {assigned.worker_id} became busy; trying again")
        result.total_s = time.monotonic() - started
        summarize(result, report)
        return result
    finally:
        if link is not None:
            link.close()
        ctx.term()


def ensure_worker(link: HiveLink, model: str, report: Reporter) -> WorkerAssigned:
    """Phases reuse/spawn, registration and loading: get an idle worker holding the model."""
    rid = link.client.send(EnsureWorker(model=model))
    for frame in link.client.replies(rid, LOAD_PROGRESS_TIMEOUT_S):
        if isinstance(frame, Progress):
            if frame.phase == "loading":
                report.loading(frame.done / frame.total if frame.total else 0.0)
            else:
                report.phase("worker" if frame.phase == "spawn" else frame.phase, frame.message)
        elif isinstance(frame, WorkerAssigned):
            if frame.reused:
                report.phase("worker", f"reusing idle worker {frame.worker_id} ({frame.model})")
            else:
                report.phase(
                    "ready",
                    f"worker {frame.worker_id} loaded {frame.model} in {frame.load_s:.2f} s",
                )
            return frame
    raise AssertionError("replies() ends only by raising")  # pragma: no cover


def stream_job(
    link: HiveLink,
    worker_id: str,
    params: GenerateParams,
    result: InferResult,
    report: Reporter,
    out: TextIO,
    started: float,
) -> None:
    """Subscribe, start the job, print tokens as they come; Ctrl-C cancels the job."""
    job_id = "j-" + uuid.uuid4().hex[:16]
    sub = StreamSubscriber(link.ctx, link.stream_endpoint, STREAM_HWM)
    sub.subscribe(job_id)  # before StartJob: the hive waits for it, so no token is missed
    try:
        link.client.request(
            StartJob(job_id=job_id, worker_id=worker_id, params=params), REQUEST_TIMEOUT_S
        )
        report.phase("inference", f"job {job_id} on worker {worker_id}")
        stream = JobStream(link.client, sub, job_id)
        try:
            for frame in stream:
                if isinstance(frame, Token):
                    if not result.tokens:
                        result.first_token_s = time.monotonic() - started
                    result.tokens += 1
                    emit(out, frame.text, result)
                elif isinstance(frame, Done):
                    emit(out, frame.tail, result)
                    result.done = frame
                elif isinstance(frame, StreamError):
                    raise describe(frame)
        except KeyboardInterrupt:
            cancel(link, job_id)
            raise Canceled(f"canceled after {result.tokens} tokens") from None
    finally:
        sub.close()
        if result.text and not result.text.endswith("\n"):
            out.write("\n")
            out.flush()


def emit(out: TextIO, text: str, result: InferResult) -> None:
    """Print text as it arrives."""
    if text:
        out.write(text)
        out.flush()
        result.text += text


def cancel(link: HiveLink, job_id: str) -> None:
    """Best-effort cancel (the hive also cancels when our subscription goes away)."""
    with contextlib.suppress(RbeeError):
        link.client.request(Cancel(job_id=job_id), CANCEL_TIMEOUT_S)


def summarize(result: InferResult, report: Reporter) -> None:
    """The closing line: tokens, duration, tokens/s, first token, why it stopped."""
    done = result.done
    if done is None:
        return
    rate = done.tokens / done.decode_s if done.decode_s > 0 else 0.0
    report.phase(
        "done",
        f"{done.tokens} tokens in {done.decode_s:.2f} s ({rate:.1f} tokens/s); "
        f"prompt {done.prompt_tokens} tokens; "
        f"first token after {result.first_token_s * 1000:.0f} ms; "
        f"stop: {done.stop_reason}; total {result.total_s:.2f} s",
    )
