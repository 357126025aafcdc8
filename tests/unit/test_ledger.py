"""The GPU memory ledger (rbee.hive.ledger): reservations of loading workers and learned sizes."""

from __future__ import annotations

from rbee.gpu import CpuInfo, CudaDevice, Inventory
from rbee.hive import fit
from rbee.hive.ledger import MAX_FACTOR, GpuLedger
from rbee.hive.placement import MemoryEstimate, Placement

GIB = 1 << 30
A = CudaDevice(0, "GPU-aaaa", "A", 80 * GIB, 70 * GIB)
B = CudaDevice(1, "GPU-bbbb", "B", 40 * GIB, 30 * GIB)
INVENTORY = Inventory(cpu=CpuInfo(2, 8 * GIB, 6 * GIB), cuda=(A, B), gpu_offload=True)
ON_A = Placement("cuda", "0", A.uuid, A.name, A.free_bytes)
ON_BOTH = Placement("cuda", "0+1", f"{A.uuid},{B.uuid}", "A + B", 0, layers=(20, 10), n_layers=30)


def free(inventory: Inventory) -> list[float]:
    return [d.free_bytes / GIB for d in inventory.cuda]


def test_a_loading_worker_holds_its_reservation_until_nvml_shows_it() -> None:
    ledger = GpuLedger()
    ledger.reserve("w-1", 101, ON_A, [10 * GIB])
    assert free(ledger.available(INVENTORY, lambda pid: None)) == [60, 30]
    # half loaded: NVML's free figure already lacks the 4 GiB it holds; 6 are still owed
    assert free(ledger.available(INVENTORY, lambda pid: 4 * GIB)) == [64, 30]
    ledger.release("w-1")
    assert free(ledger.available(INVENTORY, lambda pid: None)) == [70, 30]


def test_a_split_reserves_on_each_of_its_gpus() -> None:
    ledger = GpuLedger()
    ledger.reserve("w-2", 102, ON_BOTH, [12 * GIB, 6 * GIB])
    ledger.reserve("w-3", 103, Placement("cpu", "cpu"), [])  # the CPU reserves nothing
    assert free(ledger.available(INVENTORY, lambda pid: None)) == [58, 24]
    assert free(ledger.available(INVENTORY, lambda pid: 9 * GIB)) == [64, 27]  # 9 of 18 held


def test_two_requests_never_plan_with_the_same_free_memory() -> None:
    need = MemoryEstimate(8 * GIB, 1 * GIB, 1 * GIB, 1 * GIB, 4096, n_layers=33)

    def estimate_for(backend: str, slots: int) -> MemoryEstimate:
        return need

    ledger = GpuLedger()
    one = CudaDevice(0, "GPU-cccc", "C", 24 * GIB, 14 * GIB)
    inventory = Inventory(cpu=CpuInfo(16, 64 * GIB, 60 * GIB), cuda=(one,), gpu_offload=True)
    first = fit.plan(ledger.available(inventory, lambda pid: None), estimate_for)
    assert first.placement is not None and not first.placement.on_cpu  # 11 + 1 GiB margin ≤ 14
    ledger.reserve("w-4", 104, first.placement, fit.gpu_bytes(first.placement, need))
    second = fit.plan(ledger.available(inventory, lambda pid: None), estimate_for)
    assert second.placement is not None and second.placement.backend == "cpu"  # 3 GiB left


def test_a_measured_load_corrects_the_next_estimate_for_that_model() -> None:
    ledger = GpuLedger()
    need = MemoryEstimate(8 * GIB, 1 * GIB, 1 * GIB, 1 * GIB, 4096, n_layers=33)
    ledger.learn("/m/a.gguf", need.total_bytes, int(need.total_bytes * 1.25))
    assert ledger.corrected("/m/a.gguf", need).total_bytes == int(need.total_bytes * 1.25)
    assert ledger.corrected("/m/other.gguf", need) == need
    # the next load was planned with the corrected figure and measured the same: it stays
    corrected = ledger.corrected("/m/a.gguf", need).total_bytes
    ledger.learn("/m/a.gguf", corrected, corrected)
    assert ledger.factors["/m/a.gguf"] == 1.25
    ledger.learn("/m/a.gguf", need.total_bytes, need.total_bytes * 10)  # bounded
    assert ledger.factors["/m/a.gguf"] == MAX_FACTOR
    cpu = MemoryEstimate(8 * GIB, 1 * GIB, 1 * GIB, 0, 4096)
    assert ledger.corrected("/m/a.gguf", cpu) == cpu  # the CPU's estimate is not learned
    ledger.learn("/m/b.gguf", need.total_bytes, 0)  # nothing measured: nothing learned
    assert "/m/b.gguf" not in ledger.factors
