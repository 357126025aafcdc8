"""The node choice is a pure function: these tests need no sockets."""

from __future__ import annotations

import dataclasses

import pytest

from rbee.keeper.choose import FREE_SLOT, Candidate, choose, has_free_slot
from rbee.protocol.messages import PROTOCOL_VERSION, DeviceInfo, HiveStatus, ModelInfo, WorkerInfo

GIB = 2**30
M = "smollm2-135m-instruct"


def model(name: str = M, size: int = 100 * 2**20) -> ModelInfo:
    return ModelInfo(
        name=name,
        path=f"/m/{name}.gguf",
        size_bytes=size,
        architecture="llama",
        quantization="Q4_1",
        context_length=8192,
        parameter_count=1,
    )


def worker(
    name: str = M,
    state: str = "idle",
    backend: str = "cpu",
    device: str = "cpu",
    slots: int = 1,
    busy: int | None = None,
) -> WorkerInfo:
    """A worker as a hive shows it; a busy one has all its slots busy unless ``busy`` says."""
    if busy is None:
        busy = slots if state == "busy" else 0
    return WorkerInfo(
        worker_id="w-1",
        model=name,
        backend=backend,
        device=device,
        pid=1,
        state=state,
        last_activity=1.0,
        slots=slots,
        slots_busy=busy,
    )


def hive(
    name: str,
    free_gib: float,
    models: list[ModelInfo],
    workers: list[WorkerInfo] = (),
    proto: int = PROTOCOL_VERSION,
    draining: bool = False,
    max_workers: int = 4,
    queue: int = 0,
    devices: list[DeviceInfo] = (),
) -> Candidate:
    status = HiveStatus(
        node=name,
        rbee_version="0.1.0",
        protocol_version=proto,
        workers=list(workers),
        models=models,
        cpu_count=2,
        ram_total_bytes=64 * GIB,
        ram_free_bytes=int(free_gib * GIB),
        disk_free_bytes=GIB,
        queue_length=queue,
        max_workers=max_workers,
        devices=list(devices),
    )
    return Candidate(name, f"{name}:7830", proto, status, draining)


def test_an_idle_worker_wins_over_free_memory() -> None:
    warm = hive("warm", 1, [model()], [worker()])
    roomy = hive("roomy", 30, [model()])
    choice = choose([roomy, warm], M)
    assert choice is not None and choice.candidate.name == "warm"
    assert choice.reason == f"{FREE_SLOT} {M}"


def test_a_busy_worker_with_a_free_slot_wins_over_free_memory() -> None:
    """Slots, not workers: a worker running jobs still takes one while a slot is free."""
    batching = hive("batching", 1, [model()], [worker(state="busy", slots=4, busy=3)])
    roomy = hive("roomy", 30, [model()])
    choice = choose([roomy, batching], M)
    assert choice is not None and choice.candidate.name == "batching"
    assert choice.reason == f"{FREE_SLOT} {M}"


def test_a_worker_with_every_slot_busy_is_no_free_slot() -> None:
    full = hive("full", 1, [model()], [worker(state="busy", slots=4)], max_workers=1)
    roomy = hive("roomy", 30, [model()])
    choice = choose([full, roomy], M)
    assert choice is not None and choice.candidate.name == "roomy"
    assert FREE_SLOT not in choice.reason
    choice = choose([full], M)  # alone, it is where the job queues
    assert choice is not None and "every slot is busy, so the job will queue" in choice.reason


def test_which_workers_have_a_free_slot() -> None:
    assert has_free_slot(worker(slots=4))
    assert has_free_slot(worker(state="busy", slots=4, busy=3))
    assert not has_free_slot(worker(state="busy", slots=4, busy=4))
    assert not has_free_slot(worker(state="busy", slots=1, busy=0))  # busy runs at least one
    assert not has_free_slot(worker(state="loading", slots=4))
    assert not has_free_slot(worker(state="stopping", slots=4))


def test_the_models_home_with_room_wins_and_more_free_memory_breaks_ties() -> None:
    small = hive("small", 2, [model()])
    big = hive("big", 8, [model()])
    elsewhere = hive("elsewhere", 60, [model("other")])
    choice = choose([small, elsewhere, big], M)
    assert choice is not None and choice.candidate.name == "big"
    assert "its catalog has" in choice.reason and "8.0 GiB free" in choice.reason


def test_a_home_without_room_is_used_only_to_queue() -> None:
    full = hive("full", 8, [model()], [worker(state="busy")], max_workers=1, queue=3)
    fuller = hive("fuller", 8, [model()], [worker(state="busy")], max_workers=1, queue=5)
    choice = choose([fuller, full], M)
    assert choice is not None and choice.candidate.name == "full" and "queue" in choice.reason
    tiny = hive("tiny", 0.1, [model(size=GIB)])
    choice = choose([tiny], M)
    assert choice is not None and "queue" in choice.reason


def test_a_model_too_big_for_every_hive_goes_to_one_that_may_borrow_from_lenders() -> None:
    big = model(size=20 * GIB)
    alpha, beta = hive("alpha", 12, [big]), hive("beta", 6, [big])
    assert "queue" in str(choose([alpha, beta], M))  # nobody lends: the old answer
    gamma = hive("gamma", 16, [])
    assert gamma.status is not None
    lends = dataclasses.replace(gamma.status, lends=True, lendable_bytes=16 * GIB)
    lender = dataclasses.replace(gamma, status=lends)
    choice = choose([beta, lender, alpha], M)
    assert choice is not None and choice.candidate.name == "alpha"
    assert "no hive holds" in choice.reason and "borrow" in choice.reason and "16" in choice.reason


def test_pullable_models_go_to_the_most_free_memory() -> None:
    choice = choose([hive("a", 3, []), hive("b", 9, [])], "hf:org/repo")
    assert choice is not None and choice.candidate.name == "b" and "to pull" in choice.reason
    assert choose([hive("a", 3, [])], "not-pullable") is None


@pytest.mark.parametrize("bad", ["proto", "draining", "silent"])
def test_unusable_hives_are_never_chosen(bad: str) -> None:
    good = hive("good", 1, [model()])
    if bad == "proto":
        other = hive("other", 50, [model()], [worker()], proto=PROTOCOL_VERSION + 1)
    elif bad == "draining":
        other = hive("other", 50, [model()], [worker()], draining=True)
    else:
        other = Candidate("other", "other:7830", 1, None)
    choice = choose([other, good], M)
    assert choice is not None and choice.candidate.name == "good"
    assert choose([other], M) is None


def gpu(index: int, free_gib: float, usable: bool = True) -> DeviceInfo:
    return DeviceInfo(
        backend="cuda",
        index=index,
        uuid=f"GPU-{index}",
        free_bytes=int(free_gib * GIB),
        usable=usable,
    )


def test_a_gpu_request_goes_only_to_hives_with_such_a_gpu() -> None:
    cpu_only = hive("cpu-only", 60, [model()], [worker()])  # idle, but on the CPU
    broken = hive("broken", 60, [model()], devices=[gpu(0, 70, usable=False)])
    small = hive("small", 1, [model()], devices=[gpu(0, 6)])
    big = hive("big", 1, [model()], devices=[gpu(0, 2), gpu(1, 70)])
    choice = choose([cpu_only, broken, small, big], M, "cuda")
    assert choice is not None and choice.candidate.name == "big"
    assert "70.0 GiB CUDA free" in choice.reason
    assert choose([cpu_only, broken], M, "cuda") is None
    named = choose([small, big], M, "cuda", "GPU-0")  # by UUID: big's GPU 0 has 2 GiB free
    assert named is not None and named.candidate.name == "small"
    on_cpu = choose([cpu_only, big], M)  # the CPU still prefers the idle CPU worker
    assert on_cpu is not None and on_cpu.candidate.name == "cpu-only"


def test_an_idle_gpu_worker_counts_only_on_its_device() -> None:
    on_gpu1 = hive(
        "on-gpu1",
        1,
        [model()],
        [worker(backend="cuda", device="1")],
        devices=[gpu(0, 1), gpu(1, 1)],
    )
    roomy = hive("roomy", 1, [model()], devices=[gpu(0, 40)])
    choice = choose([roomy, on_gpu1], M, "cuda")
    assert choice is not None and choice.candidate.name == "on-gpu1" and FREE_SLOT in choice.reason
    choice = choose([roomy, on_gpu1], M, "cuda", "0")
    assert choice is not None and choice.candidate.name == "roomy"
    assert FREE_SLOT not in choice.reason


def test_auto_takes_a_warm_worker_on_any_device_first() -> None:
    on_gpu = hive("on-gpu", 1, [model()], [worker(backend="cuda", device="0")], devices=[gpu(0, 1)])
    roomy = hive("roomy", 60, [model()], devices=[gpu(0, 70)])
    choice = choose([roomy, on_gpu], M)  # no backend: auto
    assert choice is not None and choice.candidate.name == "on-gpu" and FREE_SLOT in choice.reason


def test_auto_prefers_a_hive_whose_gpu_holds_the_whole_model() -> None:
    big = model(size=20 * GIB)
    lots_of_ram = hive("lots-of-ram", 100, [big], devices=[gpu(0, 8)])
    gpu_box = hive("gpu-box", 30, [big], devices=[gpu(0, 24)])
    choice = choose([lots_of_ram, gpu_box], M)
    assert choice is not None and choice.candidate.name == "gpu-box"
    assert "a GPU with room (24.0 GiB free)" in choice.reason
    # no GPU holds it: the most free memory, RAM or GPU, wins (the hive then splits it)
    small_gpu = hive("small-gpu", 30, [big], devices=[gpu(0, 8)])
    choice = choose([lots_of_ram, small_gpu], M)
    assert choice is not None and choice.candidate.name == "lots-of-ram"
    assert "it has room (100.0 GiB free)" in choice.reason
    # forced to the CPU: GPUs do not count
    assert choose([lots_of_ram, gpu_box], M, "cpu").candidate.name == "lots-of-ram"  # type: ignore[union-attr]
