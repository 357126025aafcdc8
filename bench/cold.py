"""3: cold start, `rbee infer` with no hive running ÷ a plain llama-cpp-python script.

Both are timed the same way, from launching the process to its first byte on stdout (the first
token), same model, raw prompt, greedy. rbee's side starts an ephemeral hive, which spawns a
worker that loads the model; the plain script imports llama_cpp, loads the model and generates.
Also measured, to show where rbee's time goes: the same command with a ``file:`` model reference
(which skips the LAN survey a catalog name makes when no hive runs here) and the arrival of each
phase line on the keeper's stderr. The page cache holds the model for both sides (a warm-up run
of each comes first); "cold" means no rbee process and no loaded model.

    python bench/cold.py [--reps 5]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import PY, Row, default_model, infer_argv, isolated_env, median, run_one, standalone
from stream_efficiency import PROMPT

PLAIN = """
import sys
from rbee.hive.probe import for_model
from rbee.worker.engine import in_process
llama = in_process(sys.argv[1], for_model(sys.argv[1]))  # as a worker loads it
tokens = llama.tokenize(sys.argv[2].encode(), add_bos=True, special=True)
for token in llama.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05,
                            repeat_penalty=1.0):
    sys.stdout.buffer.write(llama.detokenize([token]))
    sys.stdout.flush()
    break
"""
PHASES = ("hive", "preflight", "worker", "ready", "inference")  # lines on the keeper's stderr
HIVE_EVENTS = {  # the ephemeral hive's log: its first line, and these events
    "hive ready": "hive ready",
    "worker spawned": "worker spawned",
    "loading model": "worker started",
    "worker ready": "worker loaded",
}


def hive_log_ms(log: Path, launched: float) -> dict[str, float]:
    """When the ephemeral hive logged its start and the worker's, ms after ``launched``."""
    seen: dict[str, float] = {}
    for n, line in enumerate(log.read_text().splitlines()):
        entry = json.loads(line)
        when = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        name = "hive started" if n == 0 else HIVE_EVENTS.get(entry["event"])
        if name:
            seen.setdefault(name, (when - launched) * 1000)
    return seen


def order(item: tuple[str, list[float]]) -> float:
    """Phases in the order they happened."""
    return median(item[1])


def run(reps: int) -> list[Row]:
    """Interleaved repetitions: plain script, `rbee infer` (catalog name), `rbee infer file:`."""
    model = str(default_model())
    plain_argv = [PY, "-c", PLAIN, model, PROMPT]
    args = ("--raw", "-t", "0", "-n", "4", PROMPT)
    by_name = infer_argv(*args)
    by_file = infer_argv("-m", f"file:{model}", *args)
    plain, named, filed = [], [], []
    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(tmp)  # nothing listens on its ports: every run starts its own hive
        run_one(plain_argv, None)
        run_one(by_name, env).summary()  # creates the catalog, like any first use
        for _ in range(reps):
            plain.append(run_one(plain_argv, None).first_output_ms())
            launched = time.time()
            done = run_one(by_name, env)
            done.summary()
            named.append(done.first_output_ms())
            seen = hive_log_ms(Path(tmp) / "ephemeral-hive.log", launched)
            seen.update({f"[{k}]": v for k, v in done.phases_ms().items() if k in PHASES})
            for phase, ms in seen.items():
                phases.setdefault(phase, []).append(ms)
            done = run_one(by_file, env)
            done.summary()
            filed.append(done.first_output_ms())
    when = ", ".join(f"{p} {median(v):.0f}" for p, v in sorted(phases.items(), key=order))
    return [
        Row(
            "3",
            "cold start, ms to first token: `rbee infer` (no hive running) ÷ plain script",
            [r / p for r, p in zip(named, plain, strict=True)],
            rbee=named,
            baseline=plain,
            op="≤",
            target=1.5,
            digits=2,
            raw_digits=0,
            note=f"ms after launch (medians; hive log, keeper's [phase] lines): {when}, "
            f"first token {median(named):.0f}; plain script {median(plain):.0f}",
        ),
        Row(
            "3",
            "cold start, ms to first token: `rbee infer -m file:PATH` ÷ plain script",
            [r / p for r, p in zip(filed, plain, strict=True)],
            rbee=filed,
            baseline=plain,
            digits=2,
            raw_digits=0,
            note="a file: reference only runs here, so the keeper skips the 0.6 s mDNS survey",
        ),
    ]


if __name__ == "__main__":
    sys.exit(standalone(run, 5))
