"""`rbee top`: a live view of every hive in reach, refreshed every few seconds.

Each refresh is one survey (rbee.keeper.survey: mDNS, RBEE_SEEDS, this machine; every hive asked
within one deadline, so a dead hive costs at most that deadline). ``Tracker`` turns successive
surveys into a ``Snapshot``: nodes, workers, rates and the errors this top met. It is pure (no
sockets, no clock of its own), so the rates and the error log are tested without a hive.

Rates: a hive's status carries each worker's cumulative ``tokens_generated`` (by the jobs it
finished): tokens per second over the last RATE_WINDOW_S, a job's tokens counted when it ends.
Errors: LAST ERRORS lists the jobs that failed lately on each hive (its status keeps the last
few: when, model, code, message) and what this top met (a hive unreachable, not paired,
incompatible, gone from reach), each with when it was last seen and how many refreshes saw it.

On a terminal the view takes the screen (rich's Live, alternate screen) and reads single keys
(stdin in cbreak mode, restored on exit, Ctrl-C and errors included): q quits, s cycles the sort
column, r refreshes now. A sampler thread surveys, so keys answer while a survey waits. Anywhere
else (a pipe, a file) or with --once it prints plain snapshots: no escape codes.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
import termios
import threading
import time
import tty
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import zmq

from rbee.errors import RbeeError
from rbee.gpu import where_text
from rbee.keeper.nodes import gpus_text, size, state_text, table
from rbee.keeper.survey import HiveView, survey
from rbee.terminal import cell

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

REFRESH_INTERVAL_S = 2.0  # the default of --interval
BROWSE_S = 0.5  # mDNS per refresh, at most (it returns once answers settle)
MIN_INTERVAL_S = 0.2
RATE_WINDOW_S = 10.0  # tokens/s over this much history: one job is not a burst
KEY_POLL_S = 0.1  # how often the screen loop looks for keys and new snapshots
ERRORS_SHOWN = 5
ERRORS_KEPT = 50
SORTS = ("node", "model", "slots", "memory", "tok/s")  # `s` cycles through these
SORT_COLUMNS = {"node": "NODE", "model": "MODEL", "slots": "SLOTS", "memory": "RSS"}
SORT_COLUMNS["tok/s"] = "TOK/S"
NUMERIC = {"WORKERS", "SLOTS", "QUEUE", "FREE RAM", "RSS", "VRAM", "JOBS", "TOK/S", "IDLE"}


@dataclass(frozen=True)
class NodeRow:
    """One hive as the view shows it."""

    name: str
    address: str
    state: str
    workers: int
    slots_busy: int
    slots: int
    queue: int | None
    ram_free: int | None
    ram_total: int | None
    gpus: str
    tokens_per_s: float | None


@dataclass(frozen=True)
class WorkerRow:
    """One worker as the view shows it."""

    node: str
    worker_id: str
    model: str
    state: str
    slots_busy: int
    slots: int
    where: str
    rss: int
    vram: int | None  # None: not a GPU worker
    jobs: int
    tokens_per_s: float | None  # None: not sampled long enough yet
    idle_s: float | None  # None: not idle


@dataclass(frozen=True)
class ErrorEntry:
    """An error this top met: first and last seen (wall clock), how many refreshes saw it."""

    node: str
    message: str
    first: float
    last: float
    count: int


@dataclass(frozen=True)
class Snapshot:
    """What one refresh found."""

    taken: float  # wall clock
    took_s: float
    nodes: list[NodeRow]
    workers: list[WorkerRow]
    errors: list[ErrorEntry]  # the latest first


@dataclass
class Tracker:
    """Successive surveys → snapshots: tokens/s from each worker's counter, and an error log."""

    window_s: float = RATE_WINDOW_S
    _history: dict[tuple[str, str], deque[tuple[float, int]]] = field(default_factory=dict)
    _errors: dict[tuple[str, str], ErrorEntry] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)  # the hives the last survey found

    def update(self, views: list[HiveView], mono: float, wall: float, took_s: float) -> Snapshot:
        """The snapshot of ``views``, surveyed at ``mono`` (monotonic) and ``wall`` seconds."""
        workers: list[WorkerRow] = []
        nodes: list[NodeRow] = []
        live: set[tuple[str, str]] = set()
        for v in views:
            node_rows: list[WorkerRow] = []
            for w in v.status.workers if v.status else []:
                key = (v.name, w.worker_id)
                live.add(key)
                node_rows.append(
                    WorkerRow(
                        node=v.name,
                        worker_id=w.worker_id,
                        model=w.model,
                        state=w.state,
                        slots_busy=w.slots_busy,
                        slots=w.slots,
                        where=where_text(w),
                        rss=w.rss_bytes,
                        vram=w.vram_bytes if w.backend == "cuda" else None,
                        jobs=w.jobs_served,
                        tokens_per_s=self._rate(key, mono, w.tokens_generated),
                        idle_s=max(0.0, wall - w.last_activity) if w.state == "idle" else None,
                    )
                )
            workers += node_rows
            nodes.append(_node_row(v, node_rows))
            if v.error:
                self.note(v.name, v.error, wall)
            for e in v.status.errors if v.status else []:  # failed jobs the hive reports
                self.reported(v.name, f"{e.code} ({e.model}): {e.message}", e.at)
            if v.cloned_id:
                self.note(v.name, "another hive announces the same node id", wall)
        for key in set(self._history) - live:
            del self._history[key]
        names = {v.name for v in views}
        for gone in sorted(self._seen - names):
            self.note(gone, "no longer in reach (no announcement, no answer)", wall)
        self._seen = names
        return Snapshot(wall, took_s, nodes, workers, self.errors())

    def note(self, node: str, message: str, wall: float) -> None:
        """Record an error met at ``wall``: a repeat updates its last time and count."""
        key = (node, message)
        old = self._errors.pop(key, None)
        first, count = (old.first, old.count + 1) if old else (wall, 1)
        self._errors[key] = ErrorEntry(node, message, first, wall, count)  # now the newest
        while len(self._errors) > ERRORS_KEPT:
            del self._errors[next(iter(self._errors))]

    def reported(self, node: str, message: str, at: float) -> None:
        """Record a failed job a hive reported (each once, at its own time)."""
        key = (node, f"{at:.6f} {message}")
        if key not in self._errors:
            self._errors[key] = ErrorEntry(node, message, at, at, 1)
            while len(self._errors) > ERRORS_KEPT:
                del self._errors[min(self._errors, key=lambda k: self._errors[k].last)]

    def errors(self) -> list[ErrorEntry]:
        """Every error kept, the latest first."""
        noted = list(reversed(self._errors.values()))  # on a tie, the latest noted first
        return sorted(noted, key=lambda e: e.last, reverse=True)

    def _rate(self, key: tuple[str, str], mono: float, count: int) -> float | None:
        history = self._history.setdefault(key, deque())
        if history and count < history[-1][1]:
            history.clear()  # a counter that went back is another process: start again
        history.append((mono, count))
        while len(history) > 2 and mono - history[1][0] >= self.window_s:
            history.popleft()  # keep one sample at least the window old
        (t0, j0), (t1, j1) = history[0], history[-1]
        return (j1 - j0) / (t1 - t0) if t1 > t0 else None


def _node_row(v: HiveView, workers: list[WorkerRow]) -> NodeRow:
    s = v.status
    rates = [w.tokens_per_s for w in workers if w.tokens_per_s is not None]
    return NodeRow(
        name=v.name,
        address=v.endpoint,
        state=state_text(v),
        workers=len(workers),
        slots_busy=sum(w.slots_busy for w in workers),
        slots=sum(w.slots for w in workers),
        queue=s.queue_length if s else None,
        ram_free=s.ram_free_bytes if s else None,
        ram_total=s.ram_total_bytes if s else None,
        gpus=gpus_text(s) if s else "-",
        tokens_per_s=sum(rates) if rates else None,
    )


def sort_rows(snapshot: Snapshot, sort: str) -> tuple[list[NodeRow], list[WorkerRow]]:
    """Nodes and workers in the order of ``sort`` (one of SORTS): names ascending, quantities
    descending (the busiest first); ties by node, then worker."""
    nodes = sorted(snapshot.nodes, key=lambda n: n.name)
    workers = sorted(snapshot.workers, key=lambda w: (w.node, w.worker_id))
    if sort == "model":
        workers.sort(key=lambda w: w.model)
    elif sort == "slots":
        nodes.sort(key=lambda n: (n.slots_busy, n.slots), reverse=True)
        workers.sort(key=lambda w: (w.slots_busy, w.slots), reverse=True)
    elif sort == "memory":
        nodes.sort(key=lambda n: (n.ram_total or 0) - (n.ram_free or 0), reverse=True)
        workers.sort(key=lambda w: w.rss + (w.vram or 0), reverse=True)
    elif sort == "tok/s":
        nodes.sort(key=lambda n: n.tokens_per_s or 0.0, reverse=True)
        workers.sort(key=lambda w: w.tokens_per_s or 0.0, reverse=True)
    return nodes, workers


def _rate_text(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.2f}"


def _marked(header: list[str], sort: str | None) -> list[str]:
    column = SORT_COLUMNS.get(sort or "")
    return [f"{h}▼" if h == column else h for h in header]


def node_cells(nodes: list[NodeRow], sort: str | None = None) -> list[list[str]]:
    """The nodes table: a header row (the sort column marked ▼), then one row per hive."""
    header = ["NODE", "ADDRESS", "STATE", "WORKERS", "SLOTS", "QUEUE", "FREE RAM"]
    rows = [_marked([*header, "TOK/S", "GPUS"], sort)]
    for n in nodes:
        free = "-"
        if n.ram_free is not None and n.ram_total:
            free = f"{size(n.ram_free)} of {size(n.ram_total)}"
        queue = "-" if n.queue is None else str(n.queue)
        slots = f"{n.slots_busy}/{n.slots}"
        rate = _rate_text(n.tokens_per_s)
        rows.append([n.name, n.address, n.state, str(n.workers), slots, queue, free, rate, n.gpus])
    return rows


def worker_cells(workers: list[WorkerRow], sort: str | None = None) -> list[list[str]]:
    """The workers table: a header row (the sort column marked ▼), then one row per worker."""
    header = ["NODE", "WORKER", "MODEL", "STATE", "SLOTS", "WHERE", "RSS", "VRAM"]
    rows = [_marked([*header, "JOBS", "TOK/S", "IDLE"], sort)]
    for w in workers:
        slots = f"{w.slots_busy}/{w.slots}"
        vram = "-" if w.vram is None else size(w.vram)
        idle = "-" if w.idle_s is None else f"{w.idle_s:.0f} s"
        rate = _rate_text(w.tokens_per_s)
        row = [w.node, w.worker_id, w.model, w.state, slots, w.where, size(w.rss), vram]
        rows.append([*row, str(w.jobs), rate, idle])
    return rows


def error_lines(errors: list[ErrorEntry], limit: int = ERRORS_SHOWN) -> list[str]:
    """``12:03:04  beta ×3: nothing listens on its port``: the latest errors, one line each
    (×N: seen by N refreshes, the last one at that time)."""
    lines = []
    for e in errors[:limit]:
        times = f" ×{e.count}" if e.count > 1 else ""
        lines.append(f"{_clock(e.last)}  {cell(e.node)}{times}: {cell(e.message, 160)}")
    return lines


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def summary(snapshot: Snapshot, interval_s: float, sort: str) -> str:
    """The first line: counts, when it was refreshed, the sort column."""
    n, w = len(snapshot.nodes), len(snapshot.workers)
    return (
        f"rbee top · {n} hive{'s' * (n != 1)}, {w} worker{'s' * (w != 1)} · "
        f"refreshed {_clock(snapshot.taken)} in {snapshot.took_s:.1f} s, every {interval_s:g} s"
        f" · sort: {sort}"
    )


def plain(snapshot: Snapshot, interval_s: float, sort: str = SORTS[0]) -> str:
    """One snapshot as plain text (for a pipe, a file, --once): no escape codes."""
    nodes, workers = sort_rows(snapshot, sort)
    out = io.StringIO()
    out.write(summary(snapshot, interval_s, sort) + "\n")
    if nodes:
        table(node_cells(nodes), out)
    else:
        out.write("no hives found (is `rbee hive` running? RBEE_SEEDS lists hosts to ask)\n")
    if workers:
        out.write("\n")
        table(worker_cells(workers), out)
    lines = error_lines(snapshot.errors)
    if lines:
        out.write("\nlast errors:\n" + "".join(f"  {line}\n" for line in lines))
    return out.getvalue()


def screen(snapshot: Snapshot | None, interval_s: float, sort: str) -> RenderableType:
    """One snapshot for the terminal: summary, nodes, workers, last errors, the keys."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    keys = Text("q quit · s sort · r refresh now", style="dim")
    if snapshot is None:
        return Group(Text("rbee top · surveying the hives in reach…", style="bold"), keys)

    def grid(cells: list[list[str]], title: str) -> Table:
        grid = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, expand=False)
        for name in cells[0]:
            right = name.rstrip("▼") in NUMERIC
            grid.add_column(
                Text(name, style="bold reverse" if name.endswith("▼") else "bold"),
                justify="right" if right else "left",
                no_wrap=True,
                overflow="ellipsis",
            )
        for row in cells[1:]:
            grid.add_row(*(Text(cell(c)) for c in row))  # Text: a name's "[" is no markup
        return grid

    nodes, workers = sort_rows(snapshot, sort)
    parts: list[RenderableType] = [Text(summary(snapshot, interval_s, sort), style="bold"), keys]
    if nodes:
        parts.append(grid(node_cells(nodes, sort), "NODES"))
    else:
        parts.append(Text("\nno hives found (is `rbee hive` running? RBEE_SEEDS lists hosts)"))
    parts.append(grid(worker_cells(workers, sort), "WORKERS") if workers else Text("\nno workers"))
    errors = error_lines(snapshot.errors)
    parts.append(Text("\nLAST ERRORS", style="bold"))
    for line in errors or ["none"]:
        style = "red" if errors else "dim"
        parts.append(Text(line, style=style, no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def sample(ctx: zmq.Context[zmq.Socket[bytes]], tracker: Tracker, browse_s: float) -> Snapshot:
    """Survey once, within the survey's deadlines; a failed survey is an error in the log."""
    mono, wall = time.monotonic(), time.time()
    try:
        views = survey(ctx, browse_s=browse_s)
    except (RbeeError, zmq.ZMQError, OSError) as exc:
        tracker.note("top", f"survey failed: {exc}", wall)
        views = []
    return tracker.update(views, mono, wall, time.monotonic() - mono)


class Sampler:
    """A thread that surveys every ``interval_s`` (at once when asked) and keeps the latest
    snapshot. Its ZeroMQ context and sockets are its own; only snapshots cross threads."""

    def __init__(self, interval_s: float, browse_s: float) -> None:
        self.interval_s, self.browse_s = interval_s, browse_s
        self.version = 0  # bumped with every snapshot
        self.failure: BaseException | None = None
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="top-sampler", daemon=True)

    def start(self) -> None:
        """Start surveying."""
        self._thread.start()

    def latest(self) -> tuple[int, Snapshot | None]:
        """The latest snapshot and its version."""
        with self._lock:
            return self.version, self._snapshot

    def refresh_now(self) -> None:
        """Survey again without waiting for the interval."""
        self._wake.set()

    def stop(self) -> None:
        """Stop and wait: a survey under way ends within its deadline."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        tracker = Tracker()
        try:
            while not self._stopping:
                started = time.monotonic()
                snapshot = sample(ctx, tracker, self.browse_s)
                with self._lock:
                    self._snapshot, self.version = snapshot, self.version + 1
                self._wake.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
                self._wake.clear()
        except BaseException as exc:  # shown by the screen loop, which re-raises it
            self.failure = exc
        finally:
            ctx.destroy(linger=0)


@contextlib.contextmanager
def single_keys(fd: int) -> Iterator[None]:
    """The terminal on ``fd`` in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still
    interrupts), restored however the block ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_keys(fd: int | None, timeout_s: float) -> str:
    """Keys typed within ``timeout_s`` (waits that long when none, or when there is no
    terminal to read: ``fd`` None)."""
    if fd is None:
        time.sleep(timeout_s)
        return ""
    if not select.select([fd], [], [], timeout_s)[0]:
        return ""
    return os.read(fd, 64).decode("utf-8", errors="replace")


def live(interval_s: float, console: Console, browse_s: float = BROWSE_S) -> None:
    """The terminal view, until q (or Ctrl-C)."""
    from rich.live import Live

    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    sampler = Sampler(interval_s, browse_s)
    sort, shown = 0, -1
    keys = single_keys(fd) if fd is not None else contextlib.nullcontext()
    try:
        with keys, Live(console=console, screen=True, auto_refresh=False) as view:
            sampler.start()
            while True:
                version, snapshot = sampler.latest()
                if sampler.failure is not None:
                    raise sampler.failure
                typed = read_keys(fd, KEY_POLL_S) if version == shown else ""
                if "q" in typed.lower():
                    return
                if "r" in typed.lower():
                    sampler.refresh_now()
                sort = (sort + typed.lower().count("s")) % len(SORTS)
                if version != shown or typed:
                    view.update(screen(snapshot, interval_s, SORTS[sort]), refresh=True)
                    shown = version
    except KeyboardInterrupt:
        return  # Ctrl-C quits as q does
    finally:
        sampler.stop()


def printed(interval_s: float, once: bool, out: TextIO, browse_s: float = BROWSE_S) -> None:
    """Plain snapshots on ``out``: one (``once``), else one every ``interval_s`` until Ctrl-C."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tracker = Tracker()
    try:
        while True:
            started = time.monotonic()
            out.write(plain(sample(ctx, tracker, browse_s), interval_s))
            out.flush()
            if once:
                return
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
            out.write("\n")
    except KeyboardInterrupt:
        return
    finally:
        ctx.destroy(linger=0)


def top(interval_s: float = REFRESH_INTERVAL_S, once: bool = False) -> None:
    """`rbee top [--interval S] [--once]`: the live view on a terminal, else plain text."""
    interval_s = max(interval_s, MIN_INTERVAL_S)
    browse_s = min(BROWSE_S, interval_s / 2)
    if once or not sys.stdout.isatty():
        printed(interval_s, once, sys.stdout, browse_s)
        return
    from rich.console import Console

    live(interval_s, Console(file=sys.stdout), browse_s)
