"""What this hive lends, GPUs before CPUs, and the command line of the lender that lends it.

A hive with a usable GPU lends the GPU with the most free memory: a layer there runs far faster
than in RAM, and the borrower's compute for it leaves the borrower's CPU. Its lender gets that
GPU alone (CUDA_VISIBLE_DEVICES by UUID, as a CUDA worker does, so ggml's ``CUDA0`` is that GPU
whatever CUDA's own order) and serves ``--device CUDA0``. What a borrower may plan with is the
GPU's free memory less llama-server's margin and the lender's CUDA runtime, which the lender
holds before any layer. A hive with no usable GPU, or one too full to hold the runtime, lends
its RAM, and its lender sees no GPU at all (no CUDA context for nothing).

One lender lends one device: a loan is one RPC server, and llama.cpp plans the layers per
device. Pure: an Inventory in, a Lendable out; the argv from that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rbee.gpu import CUDA_VISIBLE_DEVICES, Inventory
from rbee.hive.fit import GPU_MARGIN_BYTES, usable_gpus
from rbee.hive.placement import CUDA_RUNTIME_BYTES
from rbee.paths import self_command

LENDER_GGML_DEVICE = "CUDA0"  # the one GPU its lender sees


@dataclass(frozen=True)
class Lendable:
    """The device this hive lends now and what a borrower may plan with there."""

    kind: str  # "cuda" | "cpu"
    free_bytes: int
    uuid: str = ""  # the GPU's NVML UUID (for CUDA_VISIBLE_DEVICES)
    label: str = "cpu"  # "cuda:0" or "cpu", for logs and reasons


def lendable(inventory: Inventory) -> Lendable:
    """GPUs before CPUs: the GPU with the most free memory, if it holds a lender's runtime
    with the margin left, else the RAM."""
    for gpu in usable_gpus(inventory)[:1]:
        room = gpu.free_bytes - GPU_MARGIN_BYTES - CUDA_RUNTIME_BYTES
        if room > 0:
            return Lendable("cuda", room, gpu.uuid, f"cuda:{gpu.index}")
    return Lendable("cpu", inventory.cpu.ram_free_bytes)


def lender_command(
    endpoint: str, hive_pid: int, cache_dir: Path, threads: int, what: Lendable
) -> tuple[list[str], dict[str, str]]:
    """`rbee lender`'s argv and the environment it needs besides the engine's."""
    argv = [*self_command(), "lender", "--endpoint", endpoint, "--hive-pid", str(hive_pid)]
    argv += ["--cache-dir", str(cache_dir), "--threads", str(threads)]
    if what.kind == "cuda":
        argv += ["--device", LENDER_GGML_DEVICE]
        return argv, {CUDA_VISIBLE_DEVICES: what.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    return argv, {CUDA_VISIBLE_DEVICES: ""}
