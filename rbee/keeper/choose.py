"""Choosing a hive for a request: a pure function over what the hives said about themselves.

Order of preference: a worker with a free slot already holding the model (on the backend asked
for; with ``auto``, on any); a hive whose catalog has the model and has room for a worker (with
``auto``, one whose GPU holds the whole model first); a hive that can pull the model (an ``hf:``
reference) with the most free memory; a hive holding the model whose slots are all busy (the job
queues there). A hive that speaks another protocol version, is draining, or lacks a usable GPU
of the backend asked for is never chosen. Free memory means RAM for ``cpu``, the best GPU's for
``cuda``, and the larger of the two for ``auto`` (the hive then places it: rbee.hive.fit).
"""

from __future__ import annotations

from dataclasses import dataclass

from rbee.protocol.messages import PROTOCOL_VERSION, DeviceInfo, HiveStatus, WorkerInfo

MEMORY_MARGIN_BYTES = 256 * 1024 * 1024
PULLABLE_PREFIXES = ("hf:",)
FREE_SLOT = "a worker there with a free slot already holds"


@dataclass(frozen=True)
class Candidate:
    """One hive as the keeper sees it: where it is and its answer to Status (None: no answer)."""

    name: str
    endpoint: str
    protocol_version: int
    status: HiveStatus | None
    draining: bool = False

    @property
    def usable(self) -> bool:
        """Answered, speaks our protocol, takes work."""
        return (
            self.status is not None
            and self.protocol_version == PROTOCOL_VERSION
            and not self.draining
        )


@dataclass(frozen=True)
class Choice:
    """The chosen hive and why, in words a person reads."""

    candidate: Candidate
    reason: str


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def has_free_slot(worker: WorkerInfo) -> bool:
    """Whether a loaded worker takes another job now (a busy one counts at least one job)."""
    if worker.state not in ("idle", "busy"):
        return False
    busy = max(worker.slots_busy, 1 if worker.state == "busy" else 0)
    return busy < worker.slots


def gpus(status: HiveStatus, backend: str, device: str = "") -> list[DeviceInfo]:
    """The usable GPUs of ``backend`` a hive offers (only the one named by ``device``, an index
    or a UUID, if given)."""
    return [
        d
        for d in status.devices
        if d.backend == backend and d.usable and device in ("", str(d.index), d.uuid)
    ]


def choose(
    candidates: list[Candidate], model: str, backend: str = "auto", device: str = ""
) -> Choice | None:
    """Pick the hive for ``model`` on ``backend`` (and ``device``); None when no usable hive
    can serve it. For a GPU backend only hives with such a GPU count, and free memory means
    the free memory of their best one."""
    cpu, auto = backend == "cpu", backend == "auto"
    usable = [
        c
        for c in candidates
        if c.usable and (cpu or auto or (c.status and gpus(c.status, backend, device)))
    ]
    memory = "" if cpu or auto else f" {backend.upper()}"

    def gpu_free(c: Candidate) -> int:
        assert c.status is not None
        return max((d.free_bytes for d in gpus(c.status, "cuda", device)), default=0)

    def free(c: Candidate) -> int:
        assert c.status is not None
        if cpu:
            return c.status.ram_free_bytes
        if auto:
            return max(gpu_free(c), c.status.ram_free_bytes)
        return gpu_free(c)

    def on_gpu(c: Candidate) -> bool:
        """With ``auto``: whether the hive's best GPU holds the whole model."""
        return auto and gpu_free(c) >= _size(c, model) + MEMORY_MARGIN_BYTES

    def runs_it(c: Candidate, w: WorkerInfo) -> bool:
        assert c.status is not None
        if auto:
            return True
        if w.backend != backend:
            return False
        return cpu or w.device in {str(d.index) for d in gpus(c.status, backend, device)}

    warm = [
        c
        for c in usable
        if c.status
        and any(w.model == model and has_free_slot(w) and runs_it(c, w) for w in c.status.workers)
    ]
    if warm:
        best = max(warm, key=free)
        return Choice(best, f"{FREE_SLOT} {model}")
    home = [c for c in usable if c.status and any(m.name == model for m in c.status.models)]
    roomy = [c for c in home if _has_room(c, model, free(c))]
    if roomy:
        best = max(roomy, key=lambda c: (on_gpu(c), free(c)))
        if on_gpu(best):
            room = f"a GPU with room ({_gib(gpu_free(best))} free)"
        else:
            room = f"it has room ({_gib(free(best))}{memory} free)"
        return Choice(best, f"its catalog has {model} and {room}")
    if model.startswith(PULLABLE_PREFIXES) and usable:
        best = max(usable, key=free)
        return Choice(
            best, f"it has the most free{memory} memory ({_gib(free(best))}) to pull {model}"
        )
    lent = sum(c.status.lendable_bytes for c in usable if c.status and c.status.lends)
    cold = [c for c in home if c.status and all(w.model != model for w in c.status.workers)]
    if cold and lent:  # too big for each hive alone: one of them borrows the rest
        best = max(cold, key=free)
        return Choice(
            best,
            f"no hive holds {model} alone; {best.name} has it and may borrow memory from the "
            f"hives that lend it ({_gib(lent)} free there)",
        )
    if home:
        best = min(home, key=lambda c: c.status.queue_length if c.status else 0)
        return Choice(best, f"it holds {model}; every slot is busy, so the job will queue")
    return None


def _size(c: Candidate, model: str) -> int:
    assert c.status is not None
    return next((m.size_bytes for m in c.status.models if m.name == model), 0)


def _has_room(c: Candidate, model: str, free_bytes: int) -> bool:
    status = c.status
    assert status is not None
    if free_bytes < _size(c, model) + MEMORY_MARGIN_BYTES:
        return False
    live = [w for w in status.workers if w.state != "stopping"]
    # an idle worker (no job at all) may be evicted to make room
    return len(live) < status.max_workers or any(w.state == "idle" for w in live)
