"""4: the token stream, worker → hive → keeper, with rbee's synthetic engine as the source.

* Throughput: `rbee infer -m synthetic:0 -n 20000 > /dev/null` through a running hive (warm
  worker), frames/s from the keeper's summary line, against bench/raw_relay.py: the same three
  hops and processes in bare pyzmq (a zmq.proxy relay, msgpack frames of the same shape), the
  floor of this design.
* Per-frame latency: a Token frame carries no send time, so it is estimated from a paced source
  (`synthetic:1000`, one frame per ms on a fixed schedule): each frame's arrival on the keeper's
  stdout minus its scheduled time, less the smallest such value of the stream. That is the delay
  a frame picks up beyond the stream's fastest frame (p50/p99), measured the same way on the raw
  relay. The raw relay's frames do carry a send time, so its true one-way latency is shown too;
  rbee would need the same (a send timestamp in Token, CLOCK_MONOTONIC on one host) to measure
  its own.
* Per-frame Python cost: building and encoding a Token with rbee's codec, and decoding it, in
  this process, against plain msgpack of the same dict (the budget at 50,000 frames/s is 20 µs
  per frame per process, and three processes touch every frame).
* With CURVE: the same, interleaved, through a second hive started with `--secure` (CURVE on
  loopback, as on every LAN hive), the keeper paired with it the way a person does it
  (`rbee hive pair` prints a one-time code, `rbee pair` uses it).

    python bench/transport.py [--reps 5]
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

from common import (
    PY,
    RBEE,
    Hive,
    Row,
    Run,
    infer_argv,
    median,
    percentile,
    run_one,
    running_hive,
    standalone,
    synthetic_pieces,
)

FRAMES = 20_000
PACED_RATE = 1000
PACED_FRAMES = 2000
RAW = [PY, str(Path(__file__).with_name("raw_relay.py"))]
MODES = {"": (), " with CURVE": ("--secure",)}  # label: the hive's flags


def delays_ms(run: Run, rate: float, n: int) -> list[float]:
    """Each frame's arrival minus its scheduled time, less the stream's smallest such value."""
    late = [t - i / rate for i, t in enumerate(run.out.arrivals(synthetic_pieces(n), run.name))]
    best = min(late)
    return [(x - best) * 1000 for x in late]


def raw_one_way_ms(run: Run) -> tuple[float, float]:
    """The raw relay's true one-way latency, p50 and p99."""
    m = re.search(r"one-way p50 ([\d.]+) ms p99 ([\d.]+) ms", run.err.text)
    assert m is not None, run.err.text
    return float(m.group(1)), float(m.group(2))


def codec_us() -> dict[str, float]:
    """µs per frame: rbee's Token build+encode and decode, plain msgpack of the same dict."""
    import msgpack

    from rbee.protocol.codec import decode, encode
    from rbee.protocol.messages import Token

    data = encode(Token(job_id="j-0123456789abcdef", seq=12345, text=" w12345", token_id=12345))
    plain = msgpack.packb(msgpack.unpackb(data))
    body = msgpack.unpackb(data)["b"]
    n = 20_000

    def per_frame(fn: object) -> float:
        return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6  # type: ignore[arg-type]

    return {
        "rbee_encode": per_frame(
            lambda: encode(Token(job_id="j-0123456789abcdef", seq=1, text=" w1", token_id=1))
        ),
        "raw_encode": per_frame(lambda: msgpack.packb({"v": 1, "t": "token", "r": 0, "b": body})),
        "rbee_decode": per_frame(lambda: decode(data)),
        "raw_decode": per_frame(lambda: msgpack.unpackb(plain)),
    }


def pair(hive: Hive) -> None:
    """Pair this run's keeper with a `--secure` hive, as a person does (the keeper shares the
    hive's data directory here, so its key is the hive's own)."""
    port = hive.env["RBEE_HIVE_PORT"]
    with subprocess.Popen(
        [*RBEE, "hive", "pair", "--host", "127.0.0.1", "--port", port, "--role", "admin"],
        env=hive.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as pairing:
        assert pairing.stdout is not None
        code = re.search(r"\d{4}-\d{4}", pairing.stdout.readline())
        if code is None:
            raise SystemExit("`rbee hive pair` printed no code")
        argv = [*RBEE, "pair", f"127.0.0.1:{port}", code.group(0)]
        subprocess.run(argv, env=hive.env, check=True, capture_output=True, timeout=60)
        pairing.wait(30)


def run(reps: int) -> list[Row]:
    """Plain and CURVE hives against the bare relay, interleaved; then the codec's cost."""
    fast = infer_argv("-m", "synthetic:0", "-n", str(FRAMES), "--raw", "x")
    paced = infer_argv("-m", f"synthetic:{PACED_RATE}", "-n", str(PACED_FRAMES), "--raw", "x")
    fps: dict[str, list[float]] = {label: [] for label in MODES}
    lat: dict[str, list[list[float]]] = {label: [] for label in MODES}
    raw_fps, raw_lat, one_way = [], [], []
    with contextlib.ExitStack() as stack:
        hives = {}
        for label, flags in MODES.items():
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            hive = stack.enter_context(running_hive(tmp, *flags))
            if "--secure" in flags:
                pair(hive)
            run_one(fast, hive.env).summary()  # spawn the synthetic workers
            run_one(paced, hive.env).summary()
            hives[label] = hive
        for _ in range(reps):
            raw_fast = run_one([*RAW, "0", str(FRAMES)], None, stdout=False)
            raw_fps.append(raw_fast.summary().tokens_per_s)
            for label, hive in hives.items():
                summary = run_one(fast, hive.env, stdout=False).summary()
                assert summary.tokens == FRAMES
                fps[label].append(summary.tokens_per_s)
            raw = run_one([*RAW, str(PACED_RATE), str(PACED_FRAMES)], None)
            raw_lat.append(delays_ms(raw, PACED_RATE, PACED_FRAMES))
            one_way.append(raw_one_way_ms(raw))
            for label, hive in hives.items():
                lat[label].append(delays_ms(run_one(paced, hive.env), PACED_RATE, PACED_FRAMES))
    rows = []
    for label in MODES:
        rows.append(
            Row(
                "4",
                f"transport{label}: frames/s, synthetic:0 → `rbee infer`",
                fps[label],
                rbee=fps[label],
                baseline=raw_fps,
                op="≥",
                target=50_000,
                digits=0,
                raw_digits=0,
                note=""
                if label
                else f"{FRAMES:,} frames; baseline: bench/raw_relay.py (bare pyzmq, same hops)",
            )
        )
    plain, curve = MODES
    rows.append(ratio_row("frames/s, rbee ÷ bare pyzmq relay", fps[plain], raw_fps))
    rows.append(ratio_row("frames/s, CURVE ÷ plain", fps[curve], fps[plain]))
    for q in (50, 99):
        raw_q = [percentile(d, q) for d in raw_lat]
        plain_q = [percentile(d, q) for d in lat[plain]]
        rows.append(delay_row(f"p{q}, rbee − bare relay", plain_q, raw_q))
        if q == 99:
            rows[-1].note = (
                "delay beyond the stream's fastest frame (no send time in Token); the bare "
                f"relay's true one-way latency: p50 {median([o[0] for o in one_way]):.2f} ms, "
                f"p99 {median([o[1] for o in one_way]):.2f} ms"
            )
    for q in (50, 99):
        plain_q = [percentile(d, q) for d in lat[plain]]
        curve_q = [percentile(d, q) for d in lat[curve]]
        rows.append(delay_row(f"p{q}, CURVE − plain", curve_q, plain_q))
    return rows + codec_rows(reps)


def ratio_row(name: str, rbee: list[float], baseline: list[float]) -> Row:
    """A frames/s ratio."""
    figure = [r / b for r, b in zip(rbee, baseline, strict=True)]
    return Row(
        "4", f"transport: {name}", figure, rbee=rbee, baseline=baseline, digits=3, raw_digits=0
    )


def delay_row(name: str, rbee: list[float], baseline: list[float]) -> Row:
    """A per-frame delay difference."""
    return Row(
        "4",
        f"transport: per-frame delay at {PACED_RATE}/s, {name}",
        [r - b for r, b in zip(rbee, baseline, strict=True)],
        unit="ms",
        rbee=rbee,
        baseline=baseline,
        digits=2,
        raw_digits=2,
    )


def codec_rows(reps: int) -> list[Row]:
    """µs per frame of rbee's codec against plain msgpack."""
    costs = [codec_us() for _ in range(reps)]
    rows = []
    for what in ("encode", "decode"):
        rbee = [c[f"rbee_{what}"] for c in costs]
        raw = [c[f"raw_{what}"] for c in costs]
        rows.append(
            Row(
                "4",
                f"µs per frame: Token {what}, rbee codec ÷ plain msgpack",
                [r / b for r, b in zip(rbee, raw, strict=True)],
                rbee=rbee,
                baseline=raw,
                digits=1,
                raw_digits=2,
                note="build (validated Record) + encode"
                if what == "encode"
                else "decode + validate",
            )
        )
    return rows


if __name__ == "__main__":
    sys.exit(standalone(run, 5))
