"""llama.cpp as this machine runs it: the library, its CPU backend variant, threads, features.

rbee's build of llama-cpp-python (packaging/engine.sh) compiles llama.cpp's CPU backend once per
instruction-set level (``libggml-cpu-haswell.so``, ``-skylakex``, ``-sapphirerapids`` …) beside
libllama. ggml picks the best variant the CPU supports, but it looks for them only next to the
executable and in the working directory, so :func:`import_llama` loads them from the package's
own ``lib`` directory before anything else touches llama.cpp. ``RBEE_CPU_VARIANT`` names one
variant instead (what the hive's engine probe does when the best one crashes here). A build
without variants (a CUDA build, a plain ``pip install``) has its CPU backend linked in and needs
nothing.

Every process that runs llama.cpp goes through here: workers, the hive's probe, ``rbee
--version`` and the in-process baselines of tests and benchmarks, so they all run the same code.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from rbee.paths import cache_dir

CPU_VARIANT_ENV = "RBEE_CPU_VARIANT"
BEST_VARIANT = "best"  # RBEE_CPU_VARIANT=best: ggml's own choice, whatever a probe said
CACHE_VERSION = 2  # of the engine probe's verdicts: bump when what it tries or reports changes
PROBE_FAULT_ENV = "RBEE_PROBE_FAULT"  # "extra-bufts": the engine probe dies by SIGSEGV with them
VARIANT_PREFIX = "libggml-cpu-"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True)
class EngineChoice:
    """What workers run with here, and why."""

    variant: str  # forced CPU variant, "" when ggml chooses
    extra_bufts: bool
    threads: int
    running: str = ""  # the variant the probe saw loaded ("" for a linked-in CPU backend)
    features: str = ""  # the CPU features llama.cpp used, as it reports them
    note: str = ""  # why a fast path is off; "" when nothing is
    proven: bool = False

    def describe(self) -> str:
        """One line for `rbee nodes`, the status and the log."""
        where = f"CPU variant {self.running}" if self.running else "CPU backend"
        text = f"{where} ({self.features or 'features unknown'}), {self.threads} threads"
        text += ", extra buffer types " + ("on" if self.extra_bufts else "off")
        return text + (f": {self.note}" if self.note else "")

    def worker_env(self) -> dict[str, str]:
        """The variables a worker needs to run this choice."""
        return {CPU_VARIANT_ENV: self.variant} if self.variant else {}


@functools.cache
def import_llama() -> Any:
    """``llama_cpp``, with its CPU backend variant loaded (once per process).

    The variant is ``RBEE_CPU_VARIANT`` if set (``best``: ggml's choice), else the one this
    machine's engine probe proved (so a test's or a benchmark's in-process baseline runs what
    the workers run), else ggml's choice. Raises ImportError when llama-cpp-python is missing
    or the named variant does not exist.
    """
    import llama_cpp

    libs = Path(llama_cpp.__file__).parent / "lib"
    if variant_files(libs):
        ggml = libggml()
        ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        if ggml.ggml_backend_reg_count() == 0:
            chosen = os.environ.get(CPU_VARIANT_ENV, "")
            if not chosen:  # the variant this machine's hive gives its workers, once probed
                known = cached_choice(cache_dir(), libs)
                chosen = known.variant if known is not None else ""
            if chosen and chosen != BEST_VARIANT:
                path = libs / f"{VARIANT_PREFIX}{chosen}.so"
                if not path.is_file():
                    raise ImportError(
                        f"{CPU_VARIANT_ENV}={chosen}: no such CPU variant in {libs} "
                        f"(there are: {', '.join(variant_names(libs))})"
                    )
                ggml.ggml_backend_load.restype = ctypes.c_void_p
                if not ggml.ggml_backend_load(str(path).encode()):  # loads and registers it
                    raise ImportError(f"llama.cpp could not load the CPU variant {path}")
            else:
                ggml.ggml_backend_load_all_from_path(str(libs).encode())
    return llama_cpp


GPU_DEVICE_TYPES = (1, 2)  # ggml_backend_dev_type: GPU, IGPU (0 is the CPU, 3 an accelerator)


def gpu_offload() -> bool:
    """Whether llama.cpp has a GPU to offload layers to. ``llama_supports_gpu_offload()`` also
    says yes for a build with the RPC backend (remote devices count as GPUs), which every rbee
    engine has: only a GPU device of a backend other than RPC counts here."""
    if not import_llama().llama_supports_gpu_offload():
        return False
    ggml = libggml()
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        reg_name = ggml.ggml_backend_reg_name(ggml.ggml_backend_dev_backend_reg(dev))
        if ggml.ggml_backend_dev_type(dev) in GPU_DEVICE_TYPES and reg_name != b"RPC":
            return True
    return False


@functools.cache
def libggml() -> Any:
    """ggml's library as libllama linked it (``mapped``: a second copy of it would have a
    backend registry of its own, which libllama never sees)."""
    import llama_cpp

    libs = Path(llama_cpp.__file__).parent / "lib"
    return ctypes.CDLL(str(mapped("libggml.so") or libs / "libggml.so.0"))


def mapped(prefix: str) -> Path | None:
    """The file of a shared library this process has loaded whose name starts with ``prefix``.

    A wheel has no symlinks, so ``libggml.so`` and ``libggml.so.0`` are two copies: loading the
    other one would give a second ggml with a backend registry of its own, which libllama never
    sees. This finds the copy libllama really linked.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith(prefix):
            return Path(path)
    return None


def lib_dir() -> Path | None:
    """llama-cpp-python's library directory, found without importing it (0.2 s saved)."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("llama_cpp")
        if spec is not None and spec.origin:
            return Path(spec.origin).parent / "lib"
    return None


def machine_key(libs: Path | None) -> str:
    """What the verdict depends on: the CPU, the kernel, the llama.cpp build, a forced fault."""
    parts = [str(CACHE_VERSION), platform.release(), os.environ.get(PROBE_FAULT_ENV, "")]
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                parts.append(line)
                if line.startswith("flags"):
                    break
    if libs is not None and libs.is_dir():
        for path in sorted(libs.iterdir()):
            with contextlib.suppress(OSError):
                stat = path.stat()
                parts.append(f"{path.name} {stat.st_size} {stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def verdict_file(cache_dir: Path, libs: Path | None) -> Path:
    """Where the engine probe's verdict for this machine and build is cached."""
    return cache_dir / f"engine-probe-{machine_key(libs)}.json"


def cached_choice(cache_dir: Path, libs: Path | None) -> EngineChoice | None:
    """The engine probe's proven verdict for this machine and build, if one is cached."""
    return read_verdict(verdict_file(cache_dir, libs))


def read_verdict(path: Path) -> EngineChoice | None:
    """The proven verdict stored at ``path`` (None: none, unreadable, or not proven)."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        cached = EngineChoice(**json.loads(path.read_text()))
        if cached.proven:
            return cached
    return None


def variant_files(lib_dir: Path) -> list[Path]:
    """The CPU backend variants a build ships (none for a build with one linked-in backend)."""
    return sorted(lib_dir.glob(f"{VARIANT_PREFIX}*.so"))


def variant_names(lib_dir: Path) -> list[str]:
    """The variants' names: ``haswell``, ``skylakex`` …"""
    return [p.name.removeprefix(VARIANT_PREFIX).removesuffix(".so") for p in variant_files(lib_dir)]


def loaded_variant() -> str:
    """The CPU variant this process runs (``sapphirerapids``), or "" for a linked-in backend."""
    found = mapped(VARIANT_PREFIX)
    return found.name.removeprefix(VARIANT_PREFIX).removesuffix(".so") if found else ""


def cpu_features() -> str:
    """The instruction-set features llama.cpp's CPU backend uses here (``AVX2 AVX512 AMX_INT8``)."""
    info = import_llama().llama_print_system_info().decode(errors="replace")
    cpu_part = info.split("CPU :", 1)[-1].split("|")
    features = []
    for item in cpu_part:
        name, _, value = item.partition("=")
        if value.strip() == "1":
            features.append(name.strip())
    return " ".join(features)


def default_threads() -> int:
    """How many threads a worker uses by default: what llama.cpp's own tools would take.

    llama.cpp uses the physical cores (hyperthreads share a core's vector units, so more threads
    only contend). rbee takes the same count, bounded by the CPUs this process may run on
    (affinity, as ``taskset`` or systemd's CPUAffinity set it) and by its cgroup's CPU quota
    (``cpu.max``, as a container's ``--cpus`` sets it), so a worker never runs more threads
    than it can be given. llama-cpp-python's own default, half the logical CPUs, leaves half a
    machine without hyperthreads idle.
    """
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical
    return max(1, min(physical, allowed, cgroup_cpu_limit(CGROUP_CPU_MAX) or allowed))


def cgroup_cpu_limit(path: Path) -> int:
    """The CPU quota of a cgroup v2 ``cpu.max`` file, rounded up to whole CPUs (0: none)."""
    try:
        quota, _, period = path.read_text().strip().partition(" ")
        if quota == "max":
            return 0
        return max(1, math.ceil(int(quota) / int(period or "100000")))
    except (OSError, ValueError):
        return 0


@functools.cache
def package_version() -> str:
    """llama-cpp-python's version, read from its metadata (no import of the library); ""
    where the metadata is missing."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return ""
