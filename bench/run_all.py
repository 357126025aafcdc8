"""Every benchmark of issue 8, one after the other: one table, one JSON file.

    python bench/run_all.py [--reps N] [--only warm,cold,...] [--json PATH]

Each figure is a ratio or a difference against a baseline measured in the same run, with its
repetitions interleaved; the table shows medians and the spread (min–max) of the repetitions.
The JSON file (default bench/results/bench-<time>.json) holds every repetition, and
bench/results/latest.md the same table in Markdown, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import builds
import cold
import concurrency
import dead_hive
import footprint
import peers
import transport
import warm
from common import Row, machine, markdown, table

BENCHES = {  # name: (module, default repetitions)
    "warm": (warm, 7),
    "cold": (cold, 7),  # the noisiest: three interpreters and a model load per run
    "transport": (transport, 5),
    "concurrency": (concurrency, 3),
    "peers": (peers, 5),
    "footprint": (footprint, 5),
    "builds": (builds, 5),
    "dead_hive": (dead_hive, 5),  # root only (network namespaces); otherwise says it did not run
}
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="repetitions of every benchmark")
    parser.add_argument("--only", help=f"comma list of: {', '.join(BENCHES)}")
    parser.add_argument("--json", type=Path, help="where to write the results")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    if unknown := [n for n in names if n not in BENCHES]:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    about = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in about.items()), flush=True)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    failed: dict[str, str] = {}
    started = time.monotonic()
    for name in names:
        module, reps = BENCHES[name]
        print(f"[{name}] running …", flush=True)
        t = time.monotonic()
        try:
            rows += module.run(args.reps or reps)  # type: ignore[attr-defined]
        except (Exception, SystemExit) as exc:  # one broken benchmark must not hide the rest
            failed[name] = "".join(traceback.format_exception_only(exc)).strip()
            print(f"[{name}] FAILED: {failed[name]}", file=sys.stderr, flush=True)
        timings[name] = round(time.monotonic() - t, 1)
        print(f"[{name}] {timings[name]:.0f} s", flush=True)
    about["load_average_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(table(rows))
    print(
        f"\ntotal {time.monotonic() - started:.0f} s; load average before {about['load_average']},"
        f" after {about['load_average_after']}"
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "when": stamp,
        "machine": about,
        "seconds": timings,
        "failed": failed,
        "rows": [r.to_json() for r in rows],
    }
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    (RESULTS / "latest.md").write_text(markdown(rows) + "\n")
    print(f"wrote {path} and {RESULTS / 'latest.md'}")
    for name, why in failed.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
