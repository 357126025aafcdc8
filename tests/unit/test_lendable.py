"""What a hive lends (GPUs before CPUs) and the lender's command line for it."""

from __future__ import annotations

from pathlib import Path

from rbee.gpu import CpuInfo, CudaDevice, Inventory
from rbee.hive import fit
from rbee.hive.lendable import Lendable, lendable, lender_command
from rbee.hive.placement import CUDA_RUNTIME_BYTES

GIB = 1 << 30


def inventory(*gpus: CudaDevice, offload: bool = True) -> Inventory:
    cpu = CpuInfo(cores=8, ram_total_bytes=64 * GIB, ram_free_bytes=40 * GIB)
    return Inventory(cpu=cpu, cuda=gpus, gpu_offload=offload)


def gpu(index: int, free_gib: float, note: str = "") -> CudaDevice:
    return CudaDevice(index, f"GPU-{index}", f"GPU{index}", 80 * GIB, int(free_gib * GIB), note)


def test_a_hive_with_a_gpu_lends_the_one_with_most_free_memory_less_margin_and_runtime() -> None:
    got = lendable(inventory(gpu(0, 10), gpu(1, 70)))
    room = 70 * GIB - fit.GPU_MARGIN_BYTES - CUDA_RUNTIME_BYTES
    assert got == Lendable("cuda", room, "GPU-1", "cuda:1")


def test_a_hive_lends_its_ram_without_a_usable_gpu_or_room_on_it() -> None:
    ram = Lendable("cpu", 40 * GIB)
    assert lendable(inventory()) == ram
    assert lendable(inventory(gpu(0, 70), offload=False)) == ram  # a CPU-only llama.cpp build
    assert lendable(inventory(gpu(0, 70, note="MIG"))) == ram
    assert lendable(inventory(gpu(0, 1.2))) == ram  # not even the runtime and margin fit


def test_a_gpu_lender_serves_cuda0_and_sees_only_its_gpu() -> None:
    what = Lendable("cuda", 8 * GIB, "GPU-abc", "cuda:1")
    argv, env = lender_command("127.0.0.1:5000", 42, Path("/c"), 4, what)
    at = argv.index("lender")
    assert argv[at:] == [
        "lender",
        "--endpoint",
        "127.0.0.1:5000",
        "--hive-pid",
        "42",
        "--cache-dir",
        "/c",
        "--threads",
        "4",
        "--device",
        "CUDA0",
    ]
    assert env == {"CUDA_VISIBLE_DEVICES": "GPU-abc", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_a_ram_lender_names_no_device_and_sees_no_gpu() -> None:
    argv, env = lender_command("127.0.0.1:5000", 42, Path("/c"), 4, Lendable("cpu", GIB))
    assert "--device" not in argv and env == {"CUDA_VISIBLE_DEVICES": ""}
