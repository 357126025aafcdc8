"""Where a model goes when nobody says: one GPU, several GPUs, part GPU and part CPU, or the CPU.

A request with no ``--backend`` (backend ``auto``) is placed by ``plan``, in this order, as Ollama
and llama-server's ``--fit`` do: the whole model on one GPU (the one with the most free memory);
else its layers split over several GPUs of this hive, in proportion to what each has free
(llama.cpp's layer split); else as many layers as fit on the GPUs and the rest on the CPU (a
partial offload); else the CPU. A GPU is used only with ``GPU_MARGIN_BYTES`` left free after
the estimate, llama-server's margin, because the estimate is close but the driver, other
processes and fragmentation are not. Where nothing fits, the refusal names what was needed
and what was free.

Memory per layer: the model's weights and KV cache divided evenly over llama.cpp's offloadable
layers (the repeating blocks plus the output layer, the count its load log shows as "offloaded
N/M layers"). Each GPU in use also holds a compute buffer and the CUDA runtime; the compute
buffer is counted whole on every GPU (an upper bound). The free memory planned with is the
ledger's (rbee.hive.ledger): NVML's free memory less what workers still loading have reserved.

Pure: an Inventory and an estimate function in, a Plan out, with every option weighed and why it
won or lost, which `rbee explain` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rbee.errors import InsufficientRam, InsufficientVram
from rbee.gpu import CudaDevice, Inventory, placement_label
from rbee.hive.placement import (
    Lender,
    MemoryEstimate,
    Placement,
    first_fitting,
    mib,
    slot_counts,
)

GPU_MARGIN_BYTES = 1 << 30  # left free on every GPU used (llama-server's --fit margin)

EstimateFor = Callable[[str, int], MemoryEstimate]  # (backend, slots) → the estimate


@dataclass(frozen=True)
class Option:
    """One way to place the model, weighed."""

    kind: str  # "gpu" | "split" | "partial" | "cpu"
    label: str  # where it would run: "cuda:0", "cuda:0+1 16+15/31", "cpu+cuda:0 9+22/31", "cpu"
    fits: bool
    why: str  # the arithmetic in words
    slots: int = 1


@dataclass(frozen=True)
class Plan:
    """The placement chosen (None: nothing fits), its estimate, and every option weighed."""

    placement: Placement | None
    estimate: MemoryEstimate
    options: tuple[Option, ...]
    gpus: int = 0  # usable GPUs weighed

    def refusal(self, model: str, node: str = "") -> InsufficientRam | InsufficientVram:
        """The error for a model that fits nowhere: needed against free, option by option
        (INSUFFICIENT_VRAM where GPUs were weighed too, else INSUFFICIENT_RAM)."""
        where = f" on {node}" if node else ""
        said = "; ".join(f"{o.label}: {o.why}" for o in self.options)
        text = f"{model} fits nowhere{where}: {said}"
        if self.gpus:
            return InsufficientVram(
                text,
                suggestion="stop other workers (`rbee ps`), use a smaller quantization, or "
                "another node (`rbee explain MODEL --node NODE`)",
            )
        return InsufficientRam(
            text, suggestion="stop other workers (`rbee ps`) or use a smaller quantization"
        )


def plan(inventory: Inventory, estimate_for: EstimateFor, parallel: int = 0) -> Plan:
    """Place a model on this hive's devices (free memory as ``inventory`` says, reservations
    already taken off); see the module's docstring for the order."""
    gpus = usable_gpus(inventory)
    options: list[Option] = []
    counts = slot_counts(parallel)
    if gpus:
        for weigh in (_whole, _split, _partial):
            chosen, option = weigh(inventory, gpus, estimate_for, counts)
            if option is not None:
                options.append(option)
            if chosen is not None and option is not None:
                return Plan(chosen, estimate_for("cuda", option.slots), tuple(options), len(gpus))
    elif inventory.cuda or inventory.cuda_note:
        options.append(Option("gpu", "cuda", False, inventory.cuda_note or "no usable GPU"))
    option = _cpu(inventory, estimate_for, counts)
    options.append(option)
    ram = inventory.cpu.ram_free_bytes
    chosen = Placement("cpu", "cpu", free_bytes=ram) if option.fits else None
    return Plan(chosen, estimate_for("cpu", option.slots), tuple(options), len(gpus))


def usable_gpus(inventory: Inventory) -> list[CudaDevice]:
    """The GPUs a worker may use, most free memory first (the lowest index on a tie)."""
    if not inventory.gpu_offload:
        return []
    return sorted((d for d in inventory.cuda if not d.note), key=lambda d: (-d.free_bytes, d.index))


def layer_bytes(estimate: MemoryEstimate) -> int:
    """One offloadable layer's share of the weights and the KV cache."""
    units = max(1, estimate.n_layers)
    return -(-(estimate.weights_bytes + estimate.kv_bytes) // units)


def gpu_fixed_bytes(estimate: MemoryEstimate) -> int:
    """What every GPU in use holds besides its layers: the compute buffer and the runtime."""
    return estimate.compute_bytes + estimate.runtime_bytes


def gpu_bytes(where: Placement, estimate: MemoryEstimate) -> list[int]:
    """What ``where`` puts on each of its GPUs: the whole estimate on one GPU, else each GPU's
    layers beside its compute buffer and runtime (nothing on the CPU)."""
    if where.backend != "cuda":
        return []
    if not where.layers:
        return [estimate.total_bytes]
    per, fixed = layer_bytes(estimate), gpu_fixed_bytes(estimate)
    return [n * per + fixed for n in where.layers]


def capacity(device: CudaDevice, estimate: MemoryEstimate) -> int:
    """How many layers fit on ``device`` with the margin left free."""
    room = device.free_bytes - GPU_MARGIN_BYTES - gpu_fixed_bytes(estimate)
    return max(0, room // max(1, layer_bytes(estimate)))


# --------------------------------------------------------------------------- the options


_Weighed = tuple[Placement | None, Option | None]


def _whole(
    inventory: Inventory, gpus: list[CudaDevice], estimate_for: EstimateFor, counts: list[int]
) -> _Weighed:
    best = gpus[0]
    room = best.free_bytes - GPU_MARGIN_BYTES
    need, fits = first_fitting(lambda slots: estimate_for("cuda", slots), room, counts)
    if fits:
        why = (
            f"needs {mib(need.total_bytes)} MiB + {mib(GPU_MARGIN_BYTES)} MiB margin, "
            f"{mib(best.free_bytes)} MiB free ({need.breakdown()})"
        )
        where = _gpu_placement([best], [], need.n_layers)
        label = placement_label("cuda", where.device, (), need.n_layers)
        return where, Option("gpu", label, True, why, need.slots)
    why = (
        f"needs {mib(need.total_bytes)} MiB + {mib(GPU_MARGIN_BYTES)} MiB margin, the most "
        f"free on one GPU is {mib(best.free_bytes)} MiB (cuda:{best.index})"
    )
    return None, Option("gpu", "one GPU", False, why, counts[-1])


def _split(
    inventory: Inventory, gpus: list[CudaDevice], estimate_for: EstimateFor, counts: list[int]
) -> _Weighed:
    if len(gpus) < 2:
        return None, None
    need = estimate_for("cuda", counts[-1])
    if not need.n_layers:
        return None, Option("split", "several GPUs", False, "the model's layer count is unknown")
    for slots in counts:
        need = estimate_for("cuda", slots)
        caps = [(d, capacity(d, need)) for d in gpus]
        used = [(d, c) for d, c in caps if c > 0]
        if len(used) >= 2 and sum(c for _, c in used) >= need.n_layers:
            devices, layers = _shares(need.n_layers, used)
            where = _gpu_placement(devices, layers, need.n_layers)
            why = _layers_why(devices, layers, need)
            return where, Option("split", where.label, True, why, slots)
    total = sum(capacity(d, need) for d in gpus)
    why = (
        f"{need.n_layers} layers of {mib(layer_bytes(need))} MiB; all GPUs together hold "
        f"{total} after {mib(gpu_fixed_bytes(need))} MiB each for compute and runtime and the "
        f"{mib(GPU_MARGIN_BYTES)} MiB margin"
    )
    return None, Option("split", "several GPUs", False, why, counts[-1])


def _partial(
    inventory: Inventory, gpus: list[CudaDevice], estimate_for: EstimateFor, counts: list[int]
) -> _Weighed:
    need = estimate_for("cuda", counts[-1])
    if not need.n_layers:
        return None, Option("partial", "cpu+cuda", False, "the model's layer count is unknown")
    ram = inventory.cpu.ram_free_bytes
    for slots in counts:
        need = estimate_for("cuda", slots)
        caps = [(d, min(capacity(d, need), need.n_layers - 1)) for d in gpus]
        used = [(d, c) for d, c in caps if c > 0]
        if not used:
            continue  # fewer slots leave more room per layer
        on_gpu = min(sum(c for _, c in used), need.n_layers - 1)
        devices, layers = _shares(on_gpu, used)
        on_cpu_bytes = (need.n_layers - on_gpu) * layer_bytes(need)
        if on_cpu_bytes <= ram:
            where = _gpu_placement(devices, layers, need.n_layers, on_cpu=True)
            why = _layers_why(devices, layers, need) + (
                f"; {need.n_layers - on_gpu} layers ({mib(on_cpu_bytes)} MiB) in RAM, "
                f"{mib(ram)} MiB free"
            )
            return where, Option("partial", where.label, True, why, slots)
    why = (
        f"not one layer of {mib(layer_bytes(need))} MiB fits beside "
        f"{mib(gpu_fixed_bytes(need))} MiB for compute and runtime and the "
        f"{mib(GPU_MARGIN_BYTES)} MiB margin"
    )
    if any(capacity(d, need) for d in gpus):
        why = f"the layers left for the CPU need more than the {mib(ram)} MiB of RAM free"
    return None, Option("partial", "cpu+cuda", False, why, counts[-1])


def _cpu(inventory: Inventory, estimate_for: EstimateFor, counts: list[int]) -> Option:
    free = inventory.cpu.ram_free_bytes
    need, fits = first_fitting(lambda slots: estimate_for("cpu", slots), free, counts)
    if fits:
        why = f"needs {mib(need.total_bytes)} MiB of RAM, {mib(free)} MiB free"
        return Option("cpu", "cpu", True, why, need.slots)
    why = f"needs {mib(need.total_bytes)} MiB of RAM ({need.breakdown()}), {mib(free)} MiB free"
    return Option("cpu", "cpu", False, why, need.slots)


LENDER_RUNTIME_BYTES = 256 << 20  # a lender process (Python, llama.cpp) before any layer


def borrow(
    inventory: Inventory,
    estimate_for: EstimateFor,
    lenders: Sequence[Lender],
    parallel: int = 0,
) -> tuple[Placement | None, Option | None]:
    """A model that fits nowhere here, run with some of its layers in peer hives' memory
    (llama.cpp's RPC backend, rbee.hive.borrow): as many layers as this hive's RAM holds stay
    here, the rest go to the lenders, GPUs before CPUs (the lenders that lend a GPU hold as
    many as they can, in proportion to what each has free; the lenders of RAM the rest, alike),
    each lender holding a compute buffer and its process besides. llama.cpp offloads the last
    layers, so the output layer is always among the lent ones. (None, None) with no lender in
    reach."""
    if not lenders:
        return None, None
    ram, counts = inventory.cpu.ram_free_bytes, slot_counts(parallel)
    need = estimate_for("cpu", counts[-1])
    for slots in counts:
        need = estimate_for("cpu", slots)
        if not need.n_layers:
            return None, Option("borrow", "cpu+peers", False, "the model's layer count is unknown")
        if ram < gpu_fixed_bytes(need):
            continue  # not even the compute buffer fits here: fewer slots need less
        per = layer_bytes(need)
        here = min(need.n_layers - 1, (ram - gpu_fixed_bytes(need)) // per)
        lent = need.n_layers - here
        room = [
            (lender, max(0, (lender.free_bytes - need.compute_bytes - LENDER_RUNTIME_BYTES) // per))
            for lender in lenders
        ]
        if sum(c for _, c in room) < lent:
            continue
        used = _gpus_first(lent, room)
        where = Placement(
            "cpu",
            "cpu",
            free_bytes=ram,
            layers=tuple(n for _, n in used),
            n_layers=need.n_layers,
            on_cpu=True,
            lenders=tuple(lender for lender, _ in used),
        )
        kept = mib(here * per + gpu_fixed_bytes(need))
        lent_why = ", ".join(
            f"{lender.node} {n} ({mib(n * per + need.compute_bytes)} MiB of "
            f"{mib(lender.free_bytes)} free{' on its GPU' if lender.gpu else ''})"
            for lender, n in used
        )
        why = f"{here} layers here ({kept} MiB of {mib(ram)} free), {lent_why}"
        return where, Option("borrow", where.label, True, why, slots)
    free = ", ".join(f"{lender.node} {mib(lender.free_bytes)} MiB" for lender in lenders)
    why = f"{need.n_layers} layers of {mib(layer_bytes(need))} MiB: more than here and {free} free"
    return None, Option("borrow", "cpu+peers", False, why, need.slots)


def _gpus_first(total: int, room: Sequence[tuple[Lender, int]]) -> list[tuple[Lender, int]]:
    """``total`` layers over the lenders by how many each holds (``room``): the GPU lenders'
    share first, in proportion among them, then the rest over the RAM lenders; GPU lenders
    first in the result (the order of the worker's RPC devices), none given no layer."""
    used: list[tuple[Lender, int]] = []
    left = total
    for tier in ([r for r in room if r[0].gpu], [r for r in room if not r[0].gpu]):
        take = min(left, sum(c for _, c in tier))
        shares = proportional(take, [c for _, c in tier])
        used += [(lender, n) for (lender, _), n in zip(tier, shares, strict=True) if n > 0]
        left -= take
    return used


def _gpu_placement(
    devices: Sequence[CudaDevice], layers: Sequence[int], n_layers: int, on_cpu: bool = False
) -> Placement:
    return Placement(
        backend="cuda",
        device="+".join(str(d.index) for d in devices),
        uuid=",".join(d.uuid for d in devices),
        name=" + ".join(d.name for d in devices),
        free_bytes=sum(d.free_bytes for d in devices),
        layers=tuple(layers) if len(devices) > 1 or on_cpu else (),
        n_layers=n_layers,
        on_cpu=on_cpu,
    )


def _layers_why(devices: Sequence[CudaDevice], layers: Sequence[int], need: MemoryEstimate) -> str:
    per = layer_bytes(need)
    parts = [
        f"cuda:{d.index} {n} layers ({mib(n * per + gpu_fixed_bytes(need))} MiB of "
        f"{mib(d.free_bytes)} free)"
        for d, n in zip(devices, layers, strict=True)
    ]
    return ", ".join(parts)


def _shares(
    total: int, capacities: list[tuple[CudaDevice, int]]
) -> tuple[list[CudaDevice], list[int]]:
    """``total`` layers over the devices in proportion to what each holds; a device whose
    share rounds to nothing is left out (it would hold a CUDA context for no layer)."""
    shares = proportional(total, [c for _, c in capacities])
    kept = [(d, n) for (d, _), n in zip(capacities, shares, strict=True) if n > 0]
    return [d for d, _ in kept], [n for _, n in kept]


def proportional(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), none above its weight."""
    whole = sum(weights)
    if whole <= 0:
        return [0 for _ in weights]
    shares = [min(w, total * w // whole) for w in weights]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    while left > 0:
        moved = False
        for i in order:
            if left and shares[i] < weights[i]:
                shares[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return shares
