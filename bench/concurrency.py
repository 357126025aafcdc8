"""5: K = 1, 8, 32 simultaneous streams on one hive, synthetic engine paced at 100 tokens/s.

One hive (`--max-workers 32 --max-workers-per-model 32`), first brought to 32 loaded workers.
Each repetition starts K requests at once; each runs what `rbee infer` runs
(``rbee.keeper.infer.run``, the call the command and the OpenAI gateway make) on a thread of
this process, with stdout and stderr captured in memory: a thread per stream, like the gateway,
because 32 interpreters starting at once on two cores would measure their start-up instead.

* inter-token delay added by rbee: the p99 gap between consecutive tokens as the keeper writes
  them, minus the engine's pacing (10 ms), over the window in which all K streams run;
* tokens lost: K × N minus the tokens counted by each keeper's summary line (`[done] N tokens`),
  and every stream's text must be exactly the words the engine generated, in order.

    python bench/concurrency.py [--reps 3]
"""

from __future__ import annotations

import contextlib
import io
import itertools
import sys
import tempfile
import threading
import time

from common import (
    Row,
    TimedWriter,
    environ,
    median,
    parse_summary,
    percentile,
    running_hive,
    standalone,
    synthetic_pieces,
    wait_until,
)

RATE = 100
TOKENS = 300
KS = (1, 8, 32)
MAX_K = max(KS)


def stream(env: dict[str, str], k: int) -> tuple[list[list[float]], int]:
    """K simultaneous requests; each stream's token arrival times, and the tokens counted."""
    from rbee.keeper.infer import InferRequest
    from rbee.keeper.infer import run as infer
    from rbee.protocol.messages import GenerateParams

    request = InferRequest(
        f"synthetic:{RATE}", GenerateParams(prompt="x", max_tokens=TOKENS, raw=True)
    )
    outs = [TimedWriter() for _ in range(k)]
    errs = [io.StringIO() for _ in range(k)]
    failures: list[BaseException] = []
    gate = threading.Barrier(k)

    def one(i: int) -> None:
        try:
            gate.wait()
            infer(request, outs[i], errs[i])  # type: ignore[arg-type]
        except BaseException as exc:  # reported below
            failures.append(exc)

    with environ(env):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    if failures:
        raise SystemExit(
            f"{len(failures)} of {k} streams failed: {failures[0]!r}\n{errs[0].getvalue()}"
        )
    counted = sum(parse_summary(e.getvalue(), 0, "stream").tokens for e in errs)
    pieces = synthetic_pieces(TOKENS)
    return [o.arrivals(pieces, f"stream {i}") for i, o in enumerate(outs)], counted


def gaps_ms(streams: list[list[float]]) -> list[float]:
    """Gaps between consecutive tokens of each stream while all streams run."""
    start = max(s[0] for s in streams)
    end = min(s[-1] for s in streams)
    return [
        (b - a) * 1000 for s in streams for a, b in itertools.pairwise(s) if a >= start and b <= end
    ]


class Interruptible(TimedWriter):
    """Stdout for a warm-up stream: once ``stop`` is set, the next token acts as Ctrl-C does
    (the keeper cancels its job and raises Canceled)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop
        self.interrupted = False

    def write(self, text: str) -> int:
        """Keep the text, or interrupt the keeper (once)."""
        if self.stop.is_set() and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def warm_up(env: dict[str, str]) -> None:
    """Bring the hive to MAX_K loaded workers: a request while every worker is busy spawns one.

    Requests made at once would all wait for the one worker that is loading, so they start one
    by one, each once the previous one streams; then they are all canceled.
    """
    from rbee.errors import Canceled
    from rbee.keeper.infer import InferRequest
    from rbee.keeper.infer import run as infer
    from rbee.protocol.messages import GenerateParams

    request = InferRequest(
        f"synthetic:{RATE}", GenerateParams(prompt="x", max_tokens=1 << 20, raw=True)
    )
    stop = threading.Event()

    def one(out: Interruptible) -> None:
        with contextlib.suppress(Canceled):
            infer(request, out, io.StringIO())  # type: ignore[arg-type]

    threads = []
    with environ(env):
        try:
            for _ in range(MAX_K):
                out = Interruptible(stop)
                threads.append(threading.Thread(target=one, args=(out,)))
                threads[-1].start()
                wait_until(lambda out=out: bool(out.chunks), 30, "a warm-up stream")
        finally:
            stop.set()
            for t in threads:
                t.join(30)


def run(reps: int) -> list[Row]:
    """K = 1, 8, 32, interleaved repetitions."""
    added: dict[int, list[float]] = {k: [] for k in KS}
    p99: dict[int, list[float]] = {k: [] for k in KS}
    lost: dict[int, list[float]] = {k: [] for k in KS}
    args = ("--max-workers", str(MAX_K), "--max-workers-per-model", str(MAX_K), "--max-queue", "64")
    with tempfile.TemporaryDirectory() as tmp, running_hive(tmp, *args) as hive:
        warm_up(hive.env)
        wait_until(lambda: len(hive.workers()) >= MAX_K, 10, f"{MAX_K} workers")
        time.sleep(0.5)  # the canceled jobs end at their next token
        for _ in range(reps):
            for k in KS:
                streams, counted = stream(hive.env, k)
                gaps = gaps_ms(streams)
                p99[k].append(percentile(gaps, 99))
                added[k].append(percentile(gaps, 99) - 1000 / RATE)
                lost[k].append(k * TOKENS - counted)
    rows = []
    for k in KS:
        rows.append(
            Row(
                "5",
                f"concurrency K={k}: p99 inter-token gap − pacing",
                added[k],
                unit="ms",
                rbee=p99[k],
                baseline=[1000 / RATE] * reps,
                digits=2,
                raw_digits=2,
                note=f"{k} × {TOKENS} tokens at {RATE}/s" if k == KS[0] else "",
            )
        )
        rows.append(
            Row(
                "5",
                f"concurrency K={k}: tokens lost",
                lost[k],
                rbee=[k * TOKENS - x for x in lost[k]],
                baseline=[k * TOKENS] * reps,
                op="≤",
                target=0,
                digits=0,
                raw_digits=0,
            )
        )
    print(f"median p99 gaps: { {k: round(median(v), 2) for k, v in p99.items()} }", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(standalone(run, 3))
