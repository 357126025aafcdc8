"""GPU memory promised to workers still loading, and what loads really took.

NVML's free memory lags a load: a worker spawned a moment ago holds nothing yet, so a second
request planned right after it would count the same free memory twice and both loads would run
out halfway. The ledger keeps, per GPU (by UUID, as CUDA_VISIBLE_DEVICES names them), what each
loading worker was planned to take; planning subtracts the part of it that worker's process
does not hold yet. Memory other processes hold is already missing from NVML's free figure.

After a load the worker reports what its process really holds on its GPUs; the ratio to the
estimate is kept per model file, so the next worker of that model is planned with what was
measured (llama.cpp's buffers vary with the build, the GPU and the driver).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rbee.gpu import Inventory
from rbee.hive.placement import MemoryEstimate, Placement

MIN_FACTOR, MAX_FACTOR = 0.5, 2.0  # how far one measurement may move the estimate


@dataclass(frozen=True)
class Reservation:
    """What one loading worker was planned to take on each of its GPUs."""

    pid: int
    per_gpu: dict[str, int]  # NVML UUID → bytes

    @property
    def total(self) -> int:
        """On all its GPUs together."""
        return sum(self.per_gpu.values())


class GpuLedger:
    """Reservations of loading workers, and measured ÷ estimated per model file."""

    def __init__(self) -> None:
        self.reservations: dict[str, Reservation] = {}  # worker id → its reservation
        self.factors: dict[str, float] = {}  # model path → measured ÷ estimated GPU memory

    def reserve(self, worker_id: str, pid: int, where: Placement, per_gpu: Sequence[int]) -> None:
        """A worker was spawned on ``where`` (nothing to reserve on the CPU)."""
        if where.backend != "cuda":
            return
        uuids = where.uuid.split(",")
        self.reservations[worker_id] = Reservation(pid, dict(zip(uuids, per_gpu, strict=True)))

    def release(self, worker_id: str) -> None:
        """The worker finished loading (its memory shows in NVML now), failed or exited."""
        self.reservations.pop(worker_id, None)

    def available(self, inventory: Inventory, held: Callable[[int], int | None]) -> Inventory:
        """``inventory`` with each GPU's free memory less what loading workers were promised
        and do not hold yet (``held``: a process's GPU memory, None when NVML cannot say)."""
        owed: Counter[str] = Counter()
        for reservation in self.reservations.values():
            total = reservation.total
            left = max(0, total - (held(reservation.pid) or 0))
            for uuid, planned in reservation.per_gpu.items():
                owed[uuid] += left * planned // total if total else 0
        cuda = tuple(
            dataclasses.replace(d, free_bytes=max(0, d.free_bytes - owed[d.uuid]))
            for d in inventory.cuda
        )
        return dataclasses.replace(inventory, cuda=cuda)

    def learn(self, model_path: str, estimated_bytes: int, measured_bytes: int) -> None:
        """A worker of ``model_path`` loaded: it holds ``measured_bytes`` on its GPUs where
        ``estimated_bytes`` were planned (an estimate already ``corrected``: the new factor
        is relative to the formula's own figure, not to the last correction)."""
        if estimated_bytes > 0 and measured_bytes > 0:
            factor = self.factors.get(model_path, 1.0) * measured_bytes / estimated_bytes
            self.factors[model_path] = min(MAX_FACTOR, max(MIN_FACTOR, factor))

    def corrected(self, model_path: str, estimate: MemoryEstimate) -> MemoryEstimate:
        """A GPU estimate scaled by what the last load of the same file measured."""
        factor = self.factors.get(model_path)
        if factor is None or estimate.runtime_bytes == 0:  # the CPU's estimate is not learned
            return estimate
        return dataclasses.replace(
            estimate,
            weights_bytes=int(estimate.weights_bytes * factor),
            kv_bytes=int(estimate.kv_bytes * factor),
            compute_bytes=int(estimate.compute_bytes * factor),
            runtime_bytes=int(estimate.runtime_bytes * factor),
        )
