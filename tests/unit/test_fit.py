"""Automatic placement (rbee.hive.fit): many inventories, no GPU needed.

Each case builds the inventory a hive would see (GPUs of mixed sizes, memory held by others
already off NVML's free figure, reservations taken off by the ledger) and checks the order:
one GPU, several GPUs, part GPU and part CPU, the CPU, or a refusal that names needed and free.
"""

from __future__ import annotations

import pytest

from rbee.errors import InsufficientRam, InsufficientVram
from rbee.gpu import CpuInfo, CudaDevice, Inventory, placement_label
from rbee.hive import fit, placement
from rbee.hive.placement import MemoryEstimate
from tests.unit.test_placement import SMOLLM2

GIB = 1 << 30
LLAMA70B = {  # a 70B-class header: 80 blocks, GQA
    "general.architecture": "llama",
    "llama.block_count": 80,
    "llama.embedding_length": 8192,
    "llama.feed_forward_length": 28672,
    "llama.attention.head_count": 64,
    "llama.attention.head_count_kv": 8,
    "llama.vocab_size": 128256,
}


def gpu(index: int, total_gib: float, free_gib: float, note: str = "") -> CudaDevice:
    return CudaDevice(
        index,
        f"GPU-{index:04d}aaaa",
        f"GPU{index}",
        int(total_gib * GIB),
        int(free_gib * GIB),
        note,
    )


def inventory(*gpus: CudaDevice, ram_gib: float = 100, offload: bool = True) -> Inventory:
    cpu = CpuInfo(cores=16, ram_total_bytes=128 * GIB, ram_free_bytes=int(ram_gib * GIB))
    return Inventory(cpu=cpu, cuda=gpus, gpu_offload=offload)


def estimator(header: dict[str, object], file_gib: float, n_ctx: int = 4096) -> fit.EstimateFor:
    def estimate_for(backend: str, slots: int) -> MemoryEstimate:
        return placement.estimate(header, int(file_gib * GIB), n_ctx, backend, slots)

    return estimate_for


BIG = estimator(LLAMA70B, 40)  # ~40 GiB of Q4 weights
SMALL = estimator(SMOLLM2, 0.1)


def test_a_small_model_goes_whole_to_the_gpu_with_most_free_memory() -> None:
    got = fit.plan(inventory(gpu(0, 24, 20), gpu(1, 80, 70)), SMALL)
    assert got.placement is not None
    assert (got.placement.backend, got.placement.device, got.placement.on_cpu) == (
        "cuda",
        "1",
        False,
    )
    assert got.placement.gpu_layers == -1 and got.placement.uuid == "GPU-0001aaaa"
    assert got.options[0].kind == "gpu" and got.options[0].fits
    assert got.options[0].label == "cuda:1 31/31"
    assert got.estimate.slots == placement.AUTO_SLOTS and got.estimate.runtime_bytes > 0


def test_split_over_two_gpus_in_proportion_to_free_memory() -> None:
    got = fit.plan(inventory(gpu(0, 40, 36), gpu(1, 24, 22)), BIG)
    where = got.placement
    assert where is not None and where.backend == "cuda" and not where.on_cpu
    assert where.device == "0+1" and where.uuid == "GPU-0000aaaa,GPU-0001aaaa"
    assert sum(where.layers) == where.n_layers == 81
    assert where.layers[0] > where.layers[1]  # more free memory, more layers
    assert [o.kind for o in got.options] == ["gpu", "split"]
    assert not got.options[0].fits and "one GPU" in got.options[0].label


def test_partial_offload_when_the_gpus_cannot_hold_it_all() -> None:
    got = fit.plan(inventory(gpu(0, 24, 22)), BIG)
    where = got.placement
    assert where is not None and where.on_cpu and where.device == "0"
    assert 0 < where.gpu_layers < where.n_layers
    per = fit.layer_bytes(got.estimate)
    used = where.gpu_layers * per + fit.gpu_fixed_bytes(got.estimate)
    assert used + fit.GPU_MARGIN_BYTES <= 22 * GIB  # the margin is left free
    assert (where.gpu_layers + 1) * per + fit.gpu_fixed_bytes(got.estimate) > 21 * GIB
    assert [o.kind for o in got.options] == ["gpu", "partial"]
    label = placement_label("cuda", "0", where.layers, where.n_layers, on_cpu=True)
    assert label.startswith("cpu+cuda:0 ") and label.endswith("/81")


def test_partial_offload_over_several_gpus_uses_them_all() -> None:
    got = fit.plan(inventory(gpu(0, 16, 14), gpu(1, 12, 10), gpu(2, 8, 0.5)), BIG)
    where = got.placement
    assert where is not None and where.on_cpu and where.device == "0+1"  # GPU 2 is too full
    assert len(where.layers) == 2 and all(n > 0 for n in where.layers)
    assert [o.kind for o in got.options] == ["gpu", "split", "partial"]


def test_memory_held_by_others_pushes_a_model_off_the_gpu() -> None:
    # 80 GB GPU, 78 GB of it held by another process: 2 GiB free is not enough for one layer
    # beside the runtime and the margin, so the CPU runs it.
    got = fit.plan(inventory(gpu(0, 80, 2)), BIG)
    assert got.placement is not None and got.placement.backend == "cpu"
    assert [o.kind for o in got.options] == ["gpu", "partial", "cpu"]
    assert not got.options[1].fits and "not one layer" in got.options[1].why


def test_no_gpu_or_a_cpu_only_build_runs_on_the_cpu() -> None:
    for inv in (inventory(), inventory(gpu(0, 80, 80), offload=False)):
        got = fit.plan(inv, SMALL)
        assert got.placement is not None and got.placement.backend == "cpu"
        assert got.options[-1].fits and got.options[-1].kind == "cpu"


def test_an_unusable_gpu_is_skipped() -> None:
    got = fit.plan(inventory(gpu(0, 80, 80, note="MIG is enabled"), gpu(1, 24, 20)), SMALL)
    assert got.placement is not None and got.placement.device == "1"


def test_the_hives_parallel_is_kept_and_auto_slots_shrink_to_fit() -> None:
    got = fit.plan(inventory(gpu(0, 80, 70)), SMALL, parallel=8)
    assert got.estimate.slots == 8 and got.options[0].slots == 8
    # 4 slots of a 70B model's KV do not fit beside the weights on a 48 GiB GPU; fewer do
    got = fit.plan(inventory(gpu(0, 48, 47.5)), estimator(LLAMA70B, 40, n_ctx=8192))
    assert got.placement is not None and got.placement.backend == "cuda"
    assert got.estimate.slots < placement.AUTO_SLOTS


def test_fits_nowhere_names_needed_and_free() -> None:
    got = fit.plan(inventory(gpu(0, 8, 1), ram_gib=10), BIG)
    assert got.placement is None
    error = got.refusal("llama-70b", "gpu-box")
    assert isinstance(error, InsufficientVram)
    assert "llama-70b fits nowhere on gpu-box" in error.message
    assert "MiB of RAM" in error.message and "10,240 MiB free" in error.message
    cpu_only = fit.plan(inventory(ram_gib=10), BIG)
    assert isinstance(cpu_only.refusal("llama-70b"), InsufficientRam)


def test_partial_offload_needs_room_in_ram_for_the_rest() -> None:
    got = fit.plan(inventory(gpu(0, 24, 22), ram_gib=5), BIG)
    assert got.placement is None
    partial = next(o for o in got.options if o.kind == "partial")
    assert "RAM" in partial.why and not partial.fits


@pytest.mark.parametrize(
    ("total", "weights", "want"),
    [
        (81, [50, 30], [50, 30]),
        (10, [3, 3, 3, 3], [3, 3, 2, 2]),
        (7, [100, 1], [7, 0]),
        (5, [2, 2], [2, 2]),  # never above a weight: the rest stays where it was
        (0, [4, 4], [0, 0]),
    ],
)
def test_proportional(total: int, weights: list[int], want: list[int]) -> None:
    assert fit.proportional(total, weights) == want


@pytest.mark.parametrize("gpus", range(1, 9))
def test_one_to_eight_mixed_gpus_always_place_every_layer_once(gpus: int) -> None:
    sizes = [80, 40, 24, 16, 48, 12, 80, 8][:gpus]
    frees = [s * 0.6 for s in sizes]
    devices = [gpu(i, s, f) for i, (s, f) in enumerate(zip(sizes, frees, strict=True))]
    got = fit.plan(inventory(*devices), BIG)
    where = got.placement
    assert where is not None
    if where.backend == "cuda" and where.layers:
        on_gpus = sum(where.layers)
        assert on_gpus == where.n_layers or (where.on_cpu and on_gpus < where.n_layers)
        assert len(where.layers) == len(where.device.split("+")) == len(where.uuid.split(","))
        per, fixed = fit.layer_bytes(got.estimate), fit.gpu_fixed_bytes(got.estimate)
        for index, layers in zip(where.device.split("+"), where.layers, strict=True):
            free = int(frees[int(index)] * GIB)
            assert layers * per + fixed + fit.GPU_MARGIN_BYTES <= free


# --------------------------------------------------------------------------- lent memory


def lender(node: str, free_gib: float, gpu: bool = False) -> placement.Lender:
    return placement.Lender(
        node, f"tcp://10.0.0.{len(node)}:7830", "K" * 40, int(free_gib * GIB), gpu
    )


def test_a_model_too_big_for_this_hive_borrows_the_rest_from_peers() -> None:
    here = inventory(ram_gib=16, offload=False)
    assert fit.plan(here, BIG).placement is None
    where, option = fit.borrow(here, BIG, [lender("beta", 30), lender("gamma", 10)])
    assert where is not None and option is not None and option.fits
    need = BIG("cpu", option.slots)
    per, kept = fit.layer_bytes(need), need.n_layers - sum(where.layers)
    assert where.backend == "cpu" and where.on_cpu and where.gpu_layers == sum(where.layers)
    assert [x.node for x in where.lenders] == ["beta", "gamma"]
    assert kept * per + fit.gpu_fixed_bytes(need) <= 16 * GIB  # as much as fits stays here
    assert (kept + 1) * per + fit.gpu_fixed_bytes(need) > 16 * GIB
    assert where.layers[0] > 2 * where.layers[1]  # in proportion to what each has free
    assert where.label == f"cpu+beta+gamma {kept}+{where.layers[0]}+{where.layers[1]}/81"
    assert "beta" in option.why and "gamma" in option.why


def test_borrowing_weighs_nothing_without_lenders_and_refuses_when_they_are_too_small() -> None:
    here = inventory(ram_gib=16, offload=False)
    assert fit.borrow(here, BIG, []) == (None, None)
    where, option = fit.borrow(here, BIG, [lender("beta", 4)])
    assert where is None and option is not None and not option.fits
    assert "beta 4,096 MiB free" in option.why


def test_lenders_of_gpu_memory_get_the_layers_before_lenders_of_ram() -> None:
    """GPUs before CPUs: the GPU lender fills first, though the RAM lender has more free."""
    here = inventory(ram_gib=16, offload=False)
    lenders = [lender("ram", 60), lender("gpu", 20, gpu=True)]
    where, option = fit.borrow(here, BIG, lenders)
    assert where is not None and option is not None and option.fits
    need = BIG("cpu", option.slots)
    per = fit.layer_bytes(need)
    holds = (20 * GIB - need.compute_bytes - fit.LENDER_RUNTIME_BYTES) // per
    assert [x.node for x in where.lenders] == ["gpu", "ram"]
    assert where.layers[0] == holds  # the GPU lender holds all it can
    assert "on its GPU" in option.why


def test_when_the_gpu_lenders_hold_every_lent_layer_no_ram_lender_is_used() -> None:
    here = inventory(ram_gib=16, offload=False)
    lenders = [lender("ram", 60), lender("gpu1", 30, gpu=True), lender("gpu2", 30, gpu=True)]
    where, _ = fit.borrow(here, BIG, lenders)
    assert where is not None
    assert [x.node for x in where.lenders] == ["gpu1", "gpu2"]
    assert abs(where.layers[0] - where.layers[1]) <= 1  # in proportion among the GPUs
