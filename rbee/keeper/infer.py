"""`rbee infer`: the phases of one request, said on stderr, with the tokens on stdout.

hive (reach or start one) → preflight (versions) → the job's events (rbee.keeper.job): worker
(reuse an idle one, or spawn, register and load it, with progress) → inference (stream) →
summary (tokens, duration, tokens/s).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import zmq

from rbee import grammar
from rbee.errors import Canceled, InvalidRequest, RbeeError, WorkerCrashed
from rbee.keeper import receipt as receipts
from rbee.keeper.connect import connect
from rbee.keeper.job import (
    Failed,
    Finished,
    InferJob,
    InferRequest,
    JobEvent,
    Progress,
    Started,
    Text,
    Waiting,
)
from rbee.paths import data_dir
from rbee.protocol.messages import Done, JobAccepted
from rbee.terminal import safe

__all__ = ["InferRequest", "InferResult", "Reporter", "output_grammar", "run"]

SCHEMA_HINT = 'a JSON schema is a JSON object, e.g. {"type": "object", "properties": {…}}'


def output_grammar(fmt: str | None, schema_file: str | None) -> str:
    """The grammar for ``--format json`` (any JSON object) or ``--json-schema FILE`` (documents
    valid against the schema in FILE); "" for free text. InvalidRequest, before any hive is
    contacted, when FILE cannot be read, is not JSON, or holds a schema that cannot be enforced."""
    if fmt == "json":
        return grammar.any_json_object()
    if schema_file is None:
        return ""
    try:
        with open(schema_file, encoding="utf-8") as f:
            text = f.read(grammar.MAX_SCHEMA_CHARS + 1)
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidRequest(
            f"--json-schema {schema_file}: cannot read it ({why})",
            suggestion="give the path of a file holding a JSON schema",
        ) from None
    if len(text) > grammar.MAX_SCHEMA_CHARS:
        raise InvalidRequest(
            f"--json-schema {schema_file}: over {grammar.MAX_SCHEMA_CHARS} characters"
        )
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"--json-schema {schema_file} is not JSON: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})",
            suggestion=SCHEMA_HINT,
        ) from None
    return grammar.from_schema(schema, f"the JSON schema in {schema_file}")


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
    accepted: JobAccepted | None = None  # the hive's answer to StartJob (the receipt's start)

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


def run(
    request: InferRequest,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    receipt: bool = False,
) -> InferResult:
    """Run one inference request end to end; raise an RbeeError on failure. ``receipt``:
    then say what served it (rbee.keeper.receipt)."""
    started = time.monotonic()
    report = Reporter(err)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        link = connect(ctx, request.node, request.model, request.backend, request.device)
        try:
            for note in link.notes:
                report.phase("hive", note)
            hello = link.hello
            report.phase(
                "preflight",
                f"hive {hello.node} at {link.client.endpoint}: {hello.status} "
                f"(rbee {hello.rbee_version}, protocol {hello.protocol_version})",
            )
            printer = Printer(report, out, started, request.params.max_tokens)
            follow(InferJob(link, request), printer)
        finally:
            link.close()
    finally:
        ctx.destroy(linger=0)  # never waits on a socket an error path left open
    printer.result.total_s = time.monotonic() - started
    summarize(printer.result, report)
    done, accepted = printer.result.done, printer.result.accepted
    if receipt and accepted is not None and done is not None:
        for line in receipts.lines(receipts.receipt(accepted, request.params, done)):
            report.phase("receipt", line)
    if request.params.grammar and done is not None and done.stop_reason != "eos":
        report.phase(
            "warning",
            f"the output stopped before the JSON document's end (stop: {done.stop_reason}), "
            "so it is incomplete; raise -n/--max-tokens"
            + (" or drop --stop" if done.stop_reason == "stop" else ""),
        )
    return printer.result


class Printer:
    """A job's events as `rbee infer` shows them: phases on stderr, text on stdout as it
    arrives, counted and timed in ``result`` for the summary."""

    def __init__(self, report: Reporter, out: TextIO, started: float, asked: int) -> None:
        self.report = report
        self.out = out
        self.started = started  # the command's start: the first token's wait is the person's
        self.asked = asked
        self.result = InferResult()
        self.job_id = ""  # set once a worker took the job

    def show(self, event: JobEvent) -> None:
        """Say one event; a Failed one is raised (saying where the partial text went)."""
        result = self.result
        match event:
            case Waiting(phase, message):
                self.report.phase(phase, message)
            case Progress("loading", done, total):
                self.report.loading(done / total if total else 0.0)
            case Progress("download", done, total, detail):
                self.report.download(done, total, detail)
            case Started(_, worker_id, job_id, reused, accepted):
                result.worker_id, result.reused, self.job_id = worker_id, reused, job_id
                result.accepted = accepted
                self.report.phase("inference", f"job {job_id} on worker {worker_id}")
            case Text(text, tokens, more):
                if tokens:
                    self._count(tokens)
                emit(self.out, text, result, flush=not more)
            case Finished(done):
                result.done = done
            case Failed(error):
                if self.job_id:  # the stream broke off: keep what came
                    raise with_partial(error, result, self.asked, self.job_id)
                raise error

    def _count(self, tokens: int) -> None:
        result, now = self.result, time.monotonic()
        if not result.tokens:
            result.first_token_s = now - self.started
        result.stream_s = now - self.started - result.first_token_s
        result.tokens += tokens

    def end_line(self) -> None:
        """End the text with a newline, so the prompt (or the summary) starts on its own line."""
        pieces = self.result.pieces
        if pieces and not pieces[-1].endswith("\n"):
            self.out.write("\n")
        self.out.flush()


def follow(job: InferJob, printer: Printer) -> None:
    """Show the job's events to its end. Ctrl-C, or a stdout that fails (OUTPUT_FAILED: nobody
    reads the rest), closes the events, which cancels the job on the hive."""
    events = job.events()
    try:
        with contextlib.closing(events):
            for event in events:
                printer.show(event)
    except KeyboardInterrupt:
        if not job.submitted:
            raise  # only a wait ended: nothing ran
        raise Canceled(f"canceled after {printer.result.tokens} tokens") from None
    finally:
        printer.end_line()


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
