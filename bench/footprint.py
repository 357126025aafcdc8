"""7: memory and start-up.

* Hive idle RSS: a fresh `rbee hive` with no worker, against an idle bare interpreter.
* Worker RSS minus the model file's size, after one request; against a plain script that loads
  the same model with llama-cpp-python (same context) and generates a token: the difference is
  what rbee's worker costs on top of the engine.
* `rbee --version` wall time against `python -c pass` (the interpreter's own start-up). The
  command reports llama.cpp's version and build, so it imports llama_cpp: `python -c "import
  llama_cpp"` is shown too, to tell rbee's share from the engine's.

    python bench/footprint.py [--reps 5]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from common import (
    PY,
    RBEE,
    Row,
    default_model,
    infer_argv,
    median,
    run_one,
    running_hive,
    standalone,
    wait_until,
    wall_ms,
)

MB = 1e6
IDLE = "import sys, time; print(flush=True); time.sleep(30)"
PLAIN = """
import sys, psutil
from rbee.hive.probe import for_model
from rbee.worker.engine import in_process
llama = in_process(sys.argv[1], for_model(sys.argv[1]))  # as a worker loads it
tokens = llama.tokenize(b"The history of the printing press begins", add_bos=True, special=True)
next(iter(llama.generate(tokens, temp=0.0)))
print(psutil.Process().memory_info().rss)
"""


def rss(pid: int) -> float:
    """Resident memory of a process, in bytes."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss)


def idle_python_rss() -> float:
    """RSS of a bare interpreter that has started and waits."""
    proc = subprocess.Popen([PY, "-c", IDLE], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def run(reps: int) -> list[Row]:
    """Interleaved repetitions of each measurement."""
    model = default_model()
    size = model.stat().st_size
    hive_rss, bare_rss, worker_rss, plain_rss = [], [], [], []
    version, bare, engine = [], [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as tmp, running_hive(tmp) as hive:
            time.sleep(1.0)  # settled: idle
            hive_rss.append(rss(hive.proc.pid))
            bare_rss.append(idle_python_rss())
            run_one(infer_argv("--raw", "-t", "0", "-n", "4", "hi"), hive.env).summary()
            wait_until(lambda: len(hive.workers()) == 1, 10, "the worker")
            worker_rss.append(rss(hive.workers()[0]))
        out = subprocess.run([PY, "-c", PLAIN, str(model)], capture_output=True, text=True)
        plain_rss.append(float(out.stdout.strip()))
    wall_ms([*RBEE, "--version"])  # page cache warm for all three
    for _ in range(reps):
        version.append(wall_ms([*RBEE, "--version"]))
        bare.append(wall_ms([PY, "-c", "pass"]))
        engine.append(wall_ms([PY, "-c", "import llama_cpp"]))
    return [
        Row(
            "7",
            "hive idle RSS − idle bare interpreter",
            [(h - b) / MB for h, b in zip(hive_rss, bare_rss, strict=True)],
            unit="MB",
            rbee=[h / MB for h in hive_rss],
            baseline=[b / MB for b in bare_rss],
        ),
        Row(
            "7",
            "worker RSS − model file size",
            [(w - size) / MB for w in worker_rss],
            unit="MB",
            rbee=[w / MB for w in worker_rss],
            baseline=[size / MB] * reps,
            note=f"model file {size / MB:.1f} MB",
        ),
        Row(
            "7",
            "worker RSS − plain llama-cpp-python process, same model",
            [(w - p) / MB for w, p in zip(worker_rss, plain_rss, strict=True)],
            unit="MB",
            rbee=[w / MB for w in worker_rss],
            baseline=[p / MB for p in plain_rss],
        ),
        Row(
            "7",
            "`rbee --version` − `python -c pass`, wall",
            [v - b for v, b in zip(version, bare, strict=True)],
            unit="ms",
            rbee=version,
            baseline=bare,
            note=f"`python -c 'import llama_cpp'` alone: {median(engine):.0f} ms",
        ),
    ]


if __name__ == "__main__":
    sys.exit(standalone(run, 5))
