"""The cost of CURVE: request round trip and token-stream throughput, with and without it.

Two hives on loopback, one in development mode (plain) and one with `--secure` (CURVE, the mode of
every LAN hive), the keeper paired with the second the way a person does it (`rbee hive pair`,
`rbee pair`). Interleaved runs; medians and spreads.

  1. round trip: Hello request → reply, through the keeper's own request socket (in process);
  2. stream: `rbee infer -m synthetic:0 -n 20000` (the synthetic model at full speed) tokens/s.

    python bench/curve_cost.py [--reps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import isolated_env

RBEE = [sys.executable, "-m", "rbee"]
RATE = re.compile(r"\[done\] (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)")
RTT_SAMPLES = 2000
STREAM_TOKENS = 20_000


def hive(env: dict[str, str], *flags: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*RBEE, "hive", *flags], env=env, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    return proc


def round_trips(env: dict[str, str]) -> float:
    """Median Hello round trip in µs, measured inside a keeper process."""
    code = f"""
import time, statistics, zmq
from rbee.keeper.connect import open_named
from rbee.protocol.messages import Hello
link = open_named(zmq.Context(), "127.0.0.1:{env["RBEE_HIVE_PORT"]}")
samples = []
for _ in range({RTT_SAMPLES}):
    t = time.perf_counter()
    link.client.request(Hello(), 5)
    samples.append(time.perf_counter() - t)
print(statistics.median(samples) * 1e6)
link.close()
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(out.stdout.split()[-1])


def stream(env: dict[str, str]) -> float:
    argv = [
        *RBEE,
        "infer",
        "--node",
        f"127.0.0.1:{env['RBEE_HIVE_PORT']}",
        "-m",
        "synthetic:0",
        "-n",
        str(STREAM_TOKENS),
        "--raw",
        "x",
    ]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    match = RATE.search(result.stderr)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"rbee infer failed:\n{result.stderr}")
    return float(match.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/curve_cost.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        envs = {}
        for mode in ("plain", "curve"):
            envs[mode] = isolated_env(f"{tmp}/{mode}")
        hives = [hive(envs["plain"]), hive(envs["curve"], "--secure")]
        try:
            curve = envs["curve"]
            pairing = subprocess.Popen(
                [
                    *RBEE,
                    "hive",
                    "pair",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    curve["RBEE_HIVE_PORT"],
                    "--role",
                    "admin",
                    "--timeout",
                    "30s",
                ],
                env=curve,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert pairing.stdout is not None
            code = re.search(r"\d{4}-\d{4}", pairing.stdout.readline())
            assert code is not None
            # The keeper shares the hive's data directory here, so it pairs with its own key.
            subprocess.run(
                [*RBEE, "pair", f"127.0.0.1:{curve['RBEE_HIVE_PORT']}", code.group(0)],
                env=curve,
                check=True,
                capture_output=True,
                timeout=60,
            )
            pairing.wait(30)
            for env in envs.values():
                stream(env)  # warm: the synthetic worker is loaded
            rtt: dict[str, list[float]] = {"plain": [], "curve": []}
            rate: dict[str, list[float]] = {"plain": [], "curve": []}
            for _ in range(args.reps):
                for mode, env in envs.items():
                    rtt[mode].append(round_trips(env))
                    rate[mode].append(stream(env))
        finally:
            for proc in hives:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    med = statistics.median
    rows = [
        ("request round trip, plain (µs)", rtt["plain"]),
        ("request round trip, CURVE (µs)", rtt["curve"]),
        ("stream, plain (tokens/s)", rate["plain"]),
        ("stream, CURVE (tokens/s)", rate["curve"]),
    ]
    print(f"{'measure':36} {'median':>10} {'spread':>18}")
    for name, values in rows:
        print(f"{name:36} {med(values):10.0f} {min(values):8.0f}–{max(values):<9.0f}")
    print(
        f"CURVE round trip ÷ plain: {med(rtt['curve']) / med(rtt['plain']):.2f}; "
        f"CURVE stream ÷ plain: {med(rate['curve']) / med(rate['plain']):.2f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rtt_us": rtt, "tokens_per_s": rate}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
