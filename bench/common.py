"""What the benchmarks share: isolated environments, a running hive, the `rbee` command with
timestamped output, statistics and the result rows that run_all.py prints.

Every run gets its own data directory, free ports, mDNS on loopback and a cluster name of its
own, so it never finds (or is found by) another hive on this machine or the LAN.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
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


def isolated_env(data_dir: str | Path) -> dict[str, str]:
    """The environment of one run: its own data directory, ports and cluster, loopback mDNS."""
    env = {
        **os.environ,
        "RBEE_DATA_DIR": str(data_dir),
        "RBEE_HIVE_PORT": str(free_port()),
        "RBEE_STREAM_PORT": str(free_port()),
        "RBEE_MDNS_INTERFACES": "127.0.0.1",
        "RBEE_CLUSTER": f"bench-{uuid.uuid4().hex[:12]}",
    }
    env.pop("RBEE_SEEDS", None)
    return env


@dataclass
class Hive:
    """A running `rbee hive` and the environment its keepers use."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    @property
    def port(self) -> int:
        """The hive's request port."""
        return int(self.env["RBEE_HIVE_PORT"])

    def workers(self) -> list[int]:
        """The pids of the hive's worker processes."""
        import psutil

        return [p.pid for p in psutil.Process(self.proc.pid).children()]


@contextlib.contextmanager
def running_hive(data_dir: str | Path, *args: str) -> Iterator[Hive]:
    """`rbee hive ARGS` in an isolated environment, ready (it answers Hello) when yielded."""
    env = isolated_env(data_dir)
    log = Path(data_dir) / "hive.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen([*RBEE, "hive", *args], env=env, stderr=log_file)
    try:
        wait_for_hive(proc, int(env["RBEE_HIVE_PORT"]), log)
        yield Hive(proc, env)
    finally:
        stop(proc)


def wait_for_hive(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Ask Hello (the keeper's own call) until the hive answers; fail with its log if it dies."""
    import zmq

    from rbee.errors import RbeeError
    from rbee.keeper.link import hello

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the hive exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                client, _ = hello(ctx, "127.0.0.1", port, (0.5,))
                client.close()
                return
            except RbeeError:
                time.sleep(0.1)
        raise SystemExit(f"the hive did not answer within 30 s:\n{log.read_text()[-3000:]}")
    finally:
        ctx.destroy(linger=0)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM (a hive drains and stops its workers), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ commands, timestamped


@dataclass
class Run:
    """One command's run: its stdout as timestamped chunks (perf_counter seconds), its stderr."""

    argv: list[str]
    started: float
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None

    @property
    def stdout(self) -> str:
        """Everything written to stdout."""
        return b"".join(c for _, c in self.chunks).decode(errors="replace")

    def first_output_ms(self) -> float:
        """From launching the process to its first byte on stdout."""
        if not self.chunks:
            raise SystemExit(f"no output from {' '.join(self.argv)}:\n{self.stderr}")
        return (self.chunks[0][0] - self.started) * 1000

    def summary(self) -> Summary:
        """The keeper's closing line; fails loudly if the command failed."""
        match = SUMMARY.search(self.stderr)
        if self.returncode != 0 or match is None:
            raise SystemExit(f"{' '.join(self.argv[2:])} failed ({self.returncode}):\n{self.stderr}")
        return Summary(
            int(match.group(1)), float(match.group(2)), float(match.group(3)), int(match.group(4))
        )

    def arrivals(self, pieces: Sequence[str]) -> list[float]:
        """When each expected piece of text had fully arrived on stdout (perf_counter s).

        Fails if the text is not exactly the pieces in order: a lost, repeated or reordered
        token shows up here too, not only in the token count.
        """
        data = b"".join(c for _, c in self.chunks)
        expected = "".join(pieces).encode()
        if not data.startswith(expected):
            raise SystemExit(f"{' '.join(self.argv[2:])}: the text is not what was generated")
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


@dataclass(frozen=True)
class Summary:
    """`[done] N tokens in S s (R tokens/s); first token after M ms`."""

    tokens: int
    stream_s: float
    tokens_per_s: float
    first_token_ms: int


def run_all(argvs: Sequence[list[str]], env: dict[str, str], timeout: float = 300) -> list[Run]:
    """Start every command at once and read all their output as it comes, timestamped."""
    sel = selectors.DefaultSelector()
    runs, procs, errs = [], [], []
    for argv in argvs:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        run = Run(list(argv), started)
        err: list[bytes] = []
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, (run.chunks, True))
        sel.register(proc.stderr, selectors.EVENT_READ, (err, False))
        runs.append(run)
        procs.append(proc)
        errs.append(err)
    deadline = time.monotonic() + timeout
    try:
        while sel.get_map():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out after {timeout:.0f} s: {argvs[0]}")
            for key, _ in sel.select(1.0):
                data = os.read(key.fd, 1 << 16)
                now = time.perf_counter()
                sink, timed = key.data
                if not data:
                    sel.unregister(key.fileobj)
                elif timed:
                    sink.append((now, data))
                else:
                    sink.append(data)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for run, proc, err in zip(runs, procs, errs, strict=True):
        run.returncode = proc.wait()
        run.stderr = b"".join(err).decode(errors="replace")
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    return runs


def run_one(argv: list[str], env: dict[str, str], timeout: float = 300) -> Run:
    """One command, its output timestamped."""
    return run_all([argv], env, timeout)[0]


def infer_argv(*args: str) -> list[str]:
    """`python -m rbee infer ARGS`."""
    return [*RBEE, "infer", *args]


def synthetic_pieces(n: int) -> list[str]:
    """The text the synthetic engine generates, one piece per token."""
    return [f" w{i}" for i in range(n)]


def wall_ms(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of a command that must succeed."""
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    return (time.perf_counter() - started) * 1000


# ------------------------------------------------------------------ statistics and rows


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """One line of the table: a figure (ratio or difference) per repetition, with what it was
    computed from, and the target it is held to (``op`` "≥" or "≤", or none)."""

    bench: str
    name: str
    figure: list[float]
    unit: str = ""
    rbee: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    op: str = ""
    target: float = 0.0
    digits: int = 1
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether the median meets the target (None: no target or nothing measured)."""
        if not self.op or not self.figure:
            return None
        value = median(self.figure)
        return value >= self.target if self.op == "≥" else value <= self.target

    def fmt(self, value: float) -> str:
        """A value with this row's precision."""
        return "—" if value != value else f"{value:,.{self.digits}f}"

    def to_json(self) -> dict[str, object]:
        """The row with medians and spreads, for the JSON file."""

        def stats(values: list[float]) -> dict[str, object]:
            if not values:
                return {}
            return {"median": median(values), "min": min(values), "max": max(values), "values": values}

        return {
            "bench": self.bench,
            "name": self.name,
            "unit": self.unit,
            "figure": stats(self.figure),
            "rbee": stats(self.rbee),
            "baseline": stats(self.baseline),
            "target": f"{self.op} {self.target}" if self.op else None,
            "passed": self.passed,
            "note": self.note,
        }


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table: rbee and baseline medians, the figure's median and
    spread (min–max over repetitions), the target and whether the median meets it."""
    head = f"{'#':3} {'measure':58} {'rbee':>10} {'baseline':>10} {'figure':>10} {'spread':>19}"
    lines = [head + f"  {'target':>9}  ok", "-" * (len(head) + 15)]
    for r in rows:
        spread = f"{r.fmt(min(r.figure))}–{r.fmt(max(r.figure))}" if r.figure else "—"
        target = f"{r.op} {r.target:g}" if r.op else ""
        verdict = {None: "", True: "yes", False: "NO"}[r.passed]
        name = f"{r.name} ({r.unit})" if r.unit else r.name
        lines.append(
            f"{r.bench:3} {name:58} {r.fmt(median(r.rbee)):>10} {r.fmt(median(r.baseline)):>10} "
            f"{r.fmt(median(r.figure)):>10} {spread:>19}  {target:>9}  {verdict}"
        )
        if r.note:
            lines.append(f"{'':4}  ↳ {r.note}")
    return "\n".join(lines)
