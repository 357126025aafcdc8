"""7: the llama.cpp build rbee ships against the builds it could have shipped, on this CPU.

Three wheels of the same llama-cpp-python source (packaging/engine.sh, each built once and
cached): rbee's "variants" build (every CPU variant, the best loaded at run time, with the
setting the hive's engine probe chose here), a ``-march=native`` build with extra buffer types
off (pip's default build, made safe: on some CPUs its AMX path crashes), and the portable
x86-64-v3 build rbee's binary used to ship. Each is installed into a directory of its own and
timed in a fresh process running `Llama.generate()` in-process, greedy, with rbee's thread
count; repetitions interleave the builds. tokens/s counts the tokens after the first over the
time they took, like `rbee infer`'s summary.

    python bench/builds.py [--reps 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import PY, Row, default_model, standalone

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 128
RECIPES = ("variants", "native", "v3")
TIMED = """
import json, sys, time
from rbee.hive.probe import for_model
from rbee.llamacpp import loaded_variant
from rbee.worker.engine import in_process
model, tokens, force_off = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "off"
choice = for_model(model)
if force_off:
    choice = type(choice)(**{**choice.__dict__, "extra_bufts": False})
llama = in_process(model, choice)
prompt = llama.tokenize(b"The history of the printing press begins", add_bos=True, special=True)
rates = []
for n in (16, tokens):  # the first round warms caches and threads
    times = []
    for _ in llama.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == n:
            break
    rates.append((n - 1) / (times[-1] - times[0]))
    llama.reset()
print(json.dumps({"tokens_per_s": rates[-1], "variant": loaded_variant(),
                  "extra_bufts": choice.extra_bufts, "threads": choice.threads}))
"""


def site_for(recipe: str) -> Path:
    """A directory holding that recipe's llama-cpp-python (built and installed once)."""
    wheel = Path(
        subprocess.run(
            [str(ROOT / "packaging" / "engine.sh"), recipe],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": PY},
        ).stdout.split()[-1]
    )
    site = wheel.parent / "site"
    if not (site / "llama_cpp").is_dir():
        subprocess.run(
            [PY, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
            check=True,
        )
    return site


def timed(site: Path, model: str, force_off: bool) -> dict[str, float | str | bool]:
    """One fresh process on one build: its tokens/s and what it ran."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    done = subprocess.run(
        [PY, "-c", TIMED, model, str(TOKENS), "off" if force_off else "probe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise SystemExit(f"{site}: exited with {done.returncode}:\n{done.stderr[-2000:]}")
    result: dict[str, float | str | bool] = json.loads(done.stdout.splitlines()[-1])
    return result


def run(reps: int) -> list[Row]:
    """Interleaved repetitions of the three builds."""
    model = str(default_model())
    sites = {recipe: site_for(recipe) for recipe in RECIPES}
    seen: dict[str, list[dict[str, float | str | bool]]] = {r: [] for r in RECIPES}
    for _ in range(reps):
        for recipe in RECIPES:
            seen[recipe].append(timed(sites[recipe], model, force_off=recipe == "native"))
    rates = {r: [float(x["tokens_per_s"]) for x in seen[r]] for r in RECIPES}
    chosen = seen["variants"][0]
    how = (
        f"variant {chosen['variant']}, extra buffer types "
        f"{'on' if chosen['extra_bufts'] else 'off'}, {chosen['threads']} threads"
    )
    return [
        Row(
            "7",
            "builds: rbee's (variants) ÷ -march=native, extra bufts off",
            [v / n for v, n in zip(rates["variants"], rates["native"], strict=True)],
            rbee=rates["variants"],
            baseline=rates["native"],
            op="≥",
            target=0.97,
            digits=3,
            note=f"in-process generate(), {TOKENS} tokens, greedy; rbee's build ran {how}",
        ),
        Row(
            "7",
            "builds: rbee's (variants) ÷ portable x86-64-v3",
            [v / p for v, p in zip(rates["variants"], rates["v3"], strict=True)],
            rbee=rates["variants"],
            baseline=rates["v3"],
            digits=3,
            note="x86-64-v3 ran extra buffer types "
            + ("on" if seen["v3"][0]["extra_bufts"] else "off"),
        ),
    ]


if __name__ == "__main__":
    sys.exit(standalone(run, 5))
