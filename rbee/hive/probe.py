"""The engine probe: which of llama.cpp's fast paths really work here, found out before serving.

Some fast paths crash on some machines although the CPU claims to support them: on an Intel Xeon
with AMX in a Firecracker VM, decoding through llama.cpp's AMX "extra buffer type" (weights
repacked for AMX tiles) dies with SIGSEGV, while the kernel grants the AMX permission, so no
check of CPU flags would predict it. So the hive tries, in a child process (``rbee worker
--probe``: load a small model, decode a few tokens), from the fastest setting down:

1. the best CPU variant with extra buffer types (repacked weights);
2. the same variant without them;
3. lower variants without them (AVX2, AVX, plain x86-64), where the build has variants.

Workers then load with the first setting that worked; once one has failed, the two next
that work are timed against each other and the faster wins. The verdict is cached per machine and
llama.cpp build (CPU model and flags, kernel, the library files), so only the first start after a
change pays for the probe (about a second). With no model to probe with yet, nothing is proven
and workers load without extra buffer types, the setting that needs no proof beyond the build.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from rbee import log
from rbee.llamacpp import (
    BEST_VARIANT,
    CPU_VARIANT_ENV,
    EngineChoice,
    default_threads,
    lib_dir,
    read_verdict,
    variant_names,
    verdict_file,
)
from rbee.paths import cache_dir, self_command
from rbee.process import child_env

PROBE_TIMEOUT_S = 30.0  # a small model loads and decodes in about a second
PROBE_MAX_MODEL_BYTES = 2 << 30  # a bigger model would make the probe slow: none then
REASON_CHARS = 300  # of each failed probe's reason, in the verdict's note
CANDIDATES_AFTER_A_FAILURE = 2  # working settings timed against each other once one failed
# Lower CPU variants to fall back on, each with the /proc/cpuinfo flags it needs.
FALLBACK_VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("haswell", ("avx2", "fma", "f16c", "bmi2")),
    ("sandybridge", ("avx",)),
    ("x64", ()),
)

logger = log.get(__name__)


@dataclass(frozen=True)
class Setting:
    """One way to run the engine: a CPU variant ("" for ggml's own choice) and extra bufts."""

    variant: str = ""
    extra_bufts: bool = True

    def label(self) -> str:
        """``best variant with extra buffer types`` and the like."""
        which = f"CPU variant {self.variant}" if self.variant else "the best CPU variant"
        return f"{which} {'with' if self.extra_bufts else 'without'} extra buffer types"


def ladder(libs: Path | None, cpu_flags: set[str]) -> list[Setting]:
    """The settings to try, fastest first (after the first, AVX2 with repacked weights may beat
    the best variant without them: on a Xeon whose AMX path crashes, by about 8 %)."""
    steps = [Setting("", True), Setting("", False)]
    present = set(variant_names(libs)) if libs is not None else set()
    for name, needs in FALLBACK_VARIANTS:
        if name in present and all(flag in cpu_flags for flag in needs):
            if name == FALLBACK_VARIANTS[0][0]:
                steps.insert(2, Setting(name, True))
            steps.append(Setting(name, False))
    return steps


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def choose(
    cache_dir: Path, model_path: str | None, threads: int, timeout_s: float = PROBE_TIMEOUT_S
) -> EngineChoice:
    """The engine setting for this machine: cached, else probed (see the module docstring)."""
    libs = lib_dir()
    cache = verdict_file(cache_dir, libs)  # its key hashes the CPU and library files: once
    cached = read_verdict(cache)
    if cached is not None:
        return EngineChoice(**{**asdict(cached), "threads": threads})
    if model_path is None:
        return EngineChoice(
            variant="",
            extra_bufts=False,
            threads=threads,
            note="not yet probed (no model small enough to probe with); off until proven",
        )
    failures: list[str] = []
    working: list[tuple[Setting, dict[str, object]]] = []
    for step in ladder(libs, cpu_flags()):
        outcome = run_probe(model_path, step, threads, timeout_s)
        if isinstance(outcome, str):
            failures.append(f"{step.label()}: {outcome[:REASON_CHARS]}")
            logger.warning("engine probe failed", setting=step.label(), reason=outcome)
            continue
        working.append((step, outcome))
        if not failures or len(working) == CANDIDATES_AFTER_A_FAILURE:
            break  # the fastest path works; or, past a failure, the faster of two that do
    if working:
        step, outcome = max(working, key=lambda w: _rate(w[1]))
        choice = EngineChoice(
            variant=step.variant,
            extra_bufts=step.extra_bufts,
            threads=threads,
            running=str(outcome.get("variant", "")),
            features=str(outcome.get("features", "")),
            note="; ".join(failures),
            proven=True,
        )
        with contextlib.suppress(OSError):
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(choice)))
            tmp.replace(cache)
        return choice
    return EngineChoice(
        variant="",
        extra_bufts=False,
        threads=threads,
        note="every engine probe failed (" + "; ".join(failures) + ")",
    )


def _rate(report: dict[str, object]) -> float:
    rate = report.get("tokens_per_s", 0.0)
    return float(rate) if isinstance(rate, int | float) else 0.0


def for_model(model_path: str, threads: int = 0) -> EngineChoice:
    """The setting a hive here would give its workers, probing with ``model_path`` if nothing is
    cached: what an in-process baseline (a test's reference, a benchmark's peer) must run with."""
    return choose(cache_dir(), model_path, threads or default_threads())


def run_probe(
    model_path: str, step: Setting, threads: int, timeout_s: float
) -> dict[str, object] | str:
    """Run one probe child: what it reported, or why it failed (a sentence)."""
    argv = [*self_command(), "worker", "--probe", "--model-path", model_path]
    argv += ["--threads", str(threads)] + ([] if step.extra_bufts else ["--no-extra-bufts"])
    # The CPU's fast paths are what is probed; "" is the variant a person set for the hive, else
    # ggml's choice (not a cached verdict's).
    variant = step.variant or os.environ.get(CPU_VARIANT_ENV) or BEST_VARIANT
    extra = {"CUDA_VISIBLE_DEVICES": "", CPU_VARIANT_ENV: variant}
    env = child_env(extra)
    try:
        done = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:g} s"
    if done.returncode < 0:
        return f"died by {signal.Signals(-done.returncode).name}"
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        said = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return f"exited with code {done.returncode}" + (f" ({' / '.join(said)})" if said else "")
    try:
        report = json.loads(lines[-1])
    except ValueError:
        return f"answered {lines[-1][:200]!r}"
    return report if isinstance(report, dict) else f"answered {lines[-1][:200]!r}"
