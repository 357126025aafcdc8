"""What this machine can run workers on: the CPU always, CUDA GPUs when NVML and the build agree.

A hive reports its devices in its status and its announcement, and places CUDA workers from
this picture (rbee.hive.placement), so detection must never take a hive down: no NVIDIA driver,
no ``nvidia-ml-py`` (module ``pynvml``), a GPU that fails a query or a llama.cpp build without
GPU support each just mean fewer devices, with a note saying why.

Two separate facts decide whether ``cuda`` is a backend here:

* the GPUs, from NVML: index, UUID, name, total and free memory. NVML numbers devices in PCI bus
  order, which CUDA's own numbering need not follow (CUDA_DEVICE_ORDER); rbee therefore names a
  worker's GPU to CUDA by UUID (CUDA_VISIBLE_DEVICES=GPU-…), never by index;
* whether the installed llama.cpp can offload (``llama_supports_gpu_offload()``). A CPU-only
  build given ``n_gpu_layers=-1`` silently runs on the CPU, which is exactly what rbee must not
  do behind a person's back.

Metal (macOS, Apple silicon) is documented, not implemented: a Metal build of llama.cpp answers
``llama_supports_gpu_offload()`` with true and has one GPU sharing the machine's RAM (unified
memory; its budget is Metal's ``recommendedMaxWorkingSetSize``, about 2/3 to 3/4 of RAM). NVML
does not exist there. Supporting it means a ``metal`` backend with one device whose free memory
is the RAM that is free, placed like CUDA but with no CUDA_VISIBLE_DEVICES. Nobody can test it
on the machines this project runs on, so no code claims it.

MIG slices are not listed: CUDA_VISIBLE_DEVICES would need MIG UUIDs, which NVML reports only
through the MIG handles; a MIG-enabled GPU shows up with its whole memory and a note.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from rbee.config import parse_size
from rbee.protocol.messages import DeviceInfo

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NO_GPU_BUILD_NOTE = "this llama.cpp build has no GPU support"


@dataclass(frozen=True)
class CpuInfo:
    """The CPU backend: always there."""

    cores: int
    ram_total_bytes: int
    ram_free_bytes: int


@dataclass(frozen=True)
class CudaDevice:
    """One NVIDIA GPU as NVML sees it (``index`` is NVML's, in PCI bus order)."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    note: str = ""

    @property
    def label(self) -> str:
        """How people see it: ``cuda:0 NVIDIA H100 80GB HBM3 (79.1 GiB free of 79.6)``."""
        return (
            f"cuda:{self.index} {self.name} ({self.free_bytes / 2**30:.1f} GiB free of "
            f"{self.total_bytes / 2**30:.1f})"
        )


@dataclass(frozen=True)
class Inventory:
    """Every backend and device of this machine, as detected once (a pure value).

    ``gpu_offload``: whether the llama.cpp build can put layers on a GPU. ``cuda_note``: why no
    CUDA device is listed, or why the listed ones cannot be used (empty when all is well).
    """

    cpu: CpuInfo
    cuda: tuple[CudaDevice, ...] = ()
    gpu_offload: bool = False
    cuda_note: str = ""
    driver_version: str = ""

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends a worker can be placed on here."""
        return ("cpu", "cuda") if self.cuda and self.gpu_offload else ("cpu",)

    def announce_text(self) -> str:
        """The announcement's ``be`` value: ``cpu`` or ``cpu,cuda``."""
        return ",".join(self.backends)

    def describe(self) -> str:
        """Every device in one line, for error messages that list what exists."""
        parts = [
            f"cpu ({self.cpu.cores} cores, {self.cpu.ram_free_bytes / 2**30:.1f} GiB RAM free)"
        ]
        parts += [d.label for d in self.cuda]
        if self.cuda_note:
            parts.append(f"({self.cuda_note})" if self.cuda else f"no CUDA GPU ({self.cuda_note})")
        return "; ".join(parts)

    def device_infos(self) -> list[DeviceInfo]:
        """The status's ``devices``: the CPU, then each GPU (unusable ones marked, with why)."""
        infos = [
            DeviceInfo(
                backend="cpu",
                index=0,
                name="cpu",
                total_bytes=self.cpu.ram_total_bytes,
                free_bytes=self.cpu.ram_free_bytes,
                cores=self.cpu.cores,
            )
        ]
        for d in self.cuda:
            why = d.note or ("" if self.gpu_offload else NO_GPU_BUILD_NOTE)
            infos.append(
                DeviceInfo(
                    backend="cuda",
                    index=d.index,
                    uuid=d.uuid[:96],
                    name=d.name[:256],
                    total_bytes=d.total_bytes,
                    free_bytes=d.free_bytes,
                    usable=self.gpu_offload and not d.note,
                    note=why[:256],
                )
            )
        return infos


@dataclass
class _Nvml:
    """The pynvml module once initialised, or why it could not be (cached per process)."""

    module: Any = None
    error: str = ""
    driver_version: str = ""


def detect(
    *,
    nvml: Any = None,
    gpu_offload: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> Inventory:
    """Detect this machine's devices now (free memory changes; call it for every status).

    ``nvml`` (a pynvml-like module) and ``gpu_offload`` replace the real probes in tests.
    GPUs hidden from the hive by its own CUDA_VISIBLE_DEVICES are left out: an administrator
    who set it means the hive should not use the others.
    """
    cpu = cpu_info()
    state = _nvml_state() if nvml is None else _Nvml(module=nvml)
    if state.module is None:
        devices: tuple[CudaDevice, ...] = ()
        note = state.error
    else:
        devices, note = cuda_devices(state.module)
        env = os.environ if environ is None else environ
        devices = visible(devices, env.get(CUDA_VISIBLE_DEVICES))
    offload = llama_gpu_offload() if gpu_offload is None else gpu_offload
    if devices and not offload:
        note = note or NO_GPU_BUILD_NOTE
    return Inventory(
        cpu=cpu,
        cuda=devices,
        gpu_offload=offload,
        cuda_note=note,
        driver_version=state.driver_version,
    )


def cpu_info() -> CpuInfo:
    """The CPU backend now: cores, total RAM and RAM available to a new process. Under a hive's
    memory limit (``RBEE_MEMORY_LIMIT``) the total is the limit and what is free is the limit
    less what this process's children (workers, lenders) hold, or less if the machine has less."""
    memory = psutil.virtual_memory()
    total, free = memory.total, memory.available
    limit = memory_limit()
    if limit:
        held = 0
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                held += child.memory_info().rss
        total, free = min(total, limit), min(free, max(0, limit - held))
    return CpuInfo(cores=os.cpu_count() or 1, ram_total_bytes=total, ram_free_bytes=free)


def memory_limit() -> int:
    """``RBEE_MEMORY_LIMIT`` in bytes (0: none; checked where the hive starts)."""
    try:
        return parse_size(os.environ.get("RBEE_MEMORY_LIMIT", "0") or "0")
    except ValueError:
        return 0


def cuda_devices(nvml: Any) -> tuple[tuple[CudaDevice, ...], str]:
    """Every GPU NVML lists, and a note on the ones it could not read (never raises)."""
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as exc:  # NVMLError subclasses, or anything a broken driver does
        return (), f"NVML could not count GPUs: {_text(exc)}"
    found: list[CudaDevice] = []
    problems: list[str] = []
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            device = CudaDevice(
                index=index,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
                note=_mig_note(nvml, handle),
            )
        except Exception as exc:
            problems.append(f"GPU {index}: {_text(exc)}")
            continue
        found.append(device)
    return tuple(found), "; ".join(problems)


def visible(devices: tuple[CudaDevice, ...], value: str | None) -> tuple[CudaDevice, ...]:
    """The devices a CUDA_VISIBLE_DEVICES value lets through (unset: all).

    Entries are indexes or UUIDs (a unique prefix, as CUDA accepts); CUDA stops at the first
    entry it cannot use, and so does this.
    """
    if value is None:
        return devices
    chosen: list[CudaDevice] = []
    for entry in (e.strip() for e in value.split(",")):
        match = [d for d in devices if entry and (str(d.index) == entry or _uuid_match(d, entry))]
        if len(match) != 1 or match[0] in chosen:
            break
        chosen.append(match[0])
    return tuple(chosen)


def _uuid_match(device: CudaDevice, entry: str) -> bool:
    """A UUID or unique prefix of one, with or without its ``GPU-`` head."""
    want = entry.lower().removeprefix("gpu-")
    have = device.uuid.lower().removeprefix("gpu-")
    return len(want) >= 4 and have.startswith(want)


def process_rss_bytes(pid: int) -> int:
    """RAM a process holds now (its resident set); 0 once it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def process_cpu_seconds(pid: int) -> float | None:
    """A process's CPU time so far, user and system, its threads' included (None: gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def process_vram_bytes(pid: int, *, nvml: Any = None) -> int | None:
    """GPU memory a process holds, summed over all GPUs (NVML's per-process accounting).

    None when NVML is missing or does not list the process: in a container with its own PID
    namespace NVML reports host PIDs, so "not found" is not the same as "uses nothing".
    """
    module = _nvml_state().module if nvml is None else nvml
    if module is None:
        return None
    total, seen = 0, False
    try:
        count = int(module.nvmlDeviceGetCount())
        for index in range(count):
            handle = module.nvmlDeviceGetHandleByIndex(index)
            for proc in module.nvmlDeviceGetComputeRunningProcesses(handle):
                if int(proc.pid) == pid:
                    seen = True
                    used = getattr(proc, "usedGpuMemory", None)
                    total += int(used) if isinstance(used, int) else 0
    except Exception:
        return None
    return total if seen else None


def device_used_bytes(index: int, *, nvml: Any = None) -> int | None:
    """Memory in use on one GPU by everyone (a fallback where per-process numbers are hidden)."""
    module = _nvml_state().module if nvml is None else nvml
    if module is None:
        return None
    try:
        return int(module.nvmlDeviceGetMemoryInfo(module.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:
        return None


def placement_label(
    backend: str,
    device: str,
    layers: Sequence[int] = (),
    n_layers: int = 0,
    on_cpu: bool = False,
) -> str:
    """Where a worker's layers are, as `rbee ps` and `rbee explain` show it: ``cpu``,
    ``cuda:0 31/31``, ``cuda:0+1 16+15/31``, ``cpu+cuda:0 9+22/31`` (the CPU's share first, as
    the rest of the layers; counts only when the layer count is known)."""
    if backend == "cpu":
        return "cpu"
    where = f"{backend}:{device}"
    if on_cpu:
        where = f"cpu+{where}"
    if not n_layers:
        return where
    shares = list(layers) or [n_layers]
    if on_cpu:
        shares = [n_layers - sum(shares), *shares]
    return f"{where} {'+'.join(str(n) for n in shares)}/{n_layers}"


class Placed(Protocol):
    """Where a worker runs, as its record (the hive's) and its WorkerInfo (the wire) say."""

    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def gpu_layers(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def layers(self) -> Sequence[int]: ...
    @property
    def lenders(self) -> Sequence[str]: ...


def where_text(w: Placed) -> str:
    """Where a worker's layers are: ``cpu``, ``cuda:0 31/31``, ``cuda:0+1 16+15/31``,
    ``cpu+cuda:0 9+22/31`` (a partial offload: the CPU's share first), ``cpu+beta 11+20/31``
    (layers in the memory another hive lends)."""
    if w.lenders:
        return lent_label(w.lenders, w.layers, w.n_layers)
    return worker_label(w.backend, w.device, w.gpu_layers, w.n_layers, w.layers)


def lent_label(lenders: Sequence[str], layers: Sequence[int], n_layers: int) -> str:
    """A CPU worker with ``layers`` in the memory of the ``lenders`` (peer hives), the rest
    here: ``cpu+beta 11+20/31`` (this hive's share first)."""
    n = n_layers or sum(layers)
    counts = "+".join(str(c) for c in (n - sum(layers), *layers))
    return f"cpu+{'+'.join(lenders)} {counts}/{n}"


def worker_label(
    backend: str, device: str, gpu_layers: int, n_layers: int, layers: Sequence[int] = ()
) -> str:
    """``placement_label`` for a loaded worker: ``gpu_layers`` of ``n_layers`` on its GPUs (as
    llama.cpp reported them), ``layers`` per GPU when several; fewer than all is a partial
    offload."""
    shares = list(layers) or ([gpu_layers] if n_layers else [])
    return placement_label(backend, device, shares, n_layers, 0 < gpu_layers < n_layers)


@functools.cache
def llama_gpu_offload() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU (asked once).

    Importing llama_cpp costs about 0.2 s (more for a CUDA build, which also loads the CUDA
    runtime), so it is done on first use and cached: the build does not change under a process.
    """
    try:
        from rbee.llamacpp import gpu_offload

        return gpu_offload()
    except Exception:  # not installed, or its library failed to load: no GPU offload
        return False


@functools.cache
def _nvml_state() -> _Nvml:
    """Initialise NVML once per process; remember the failure reason instead of raising."""
    try:  # a plain import, so that PyInstaller bundles it
        import pynvml as module  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return _Nvml(error="nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        module.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, …
        return _Nvml(error=f"no NVIDIA driver ({_text(exc)})")
    try:
        driver = _text(module.nvmlSystemGetDriverVersion())
    except Exception:
        driver = ""
    return _Nvml(module=module, driver_version=driver)


def _mig_note(nvml: Any, handle: Any) -> str:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # not supported on this GPU, or an older NVML
        return ""
    return "MIG is enabled: rbee cannot place a worker on a MIG slice" if current else ""


def _text(value: object) -> str:
    """NVML strings are bytes in older pynvml versions and str in newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
