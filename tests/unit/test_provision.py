"""Which running workers answer a request without a device lookup (rbee.hive.provision)."""

from __future__ import annotations

from rbee.hive.provision import _serves_without_devices
from rbee.hive.registry import WorkerRecord


def worker(backend: str, device: str) -> WorkerRecord:
    return WorkerRecord("w-1", "m", "/m.gguf", 1, backend=backend, device=device)


CPU, GPU0, GPU1, SPLIT, PARTIAL = (
    worker("cpu", "cpu"),
    worker("cuda", "0"),
    worker("cuda", "1"),
    worker("cuda", "0+1"),
    worker("cuda", "1"),
)
PARTIAL.gpu_layers, PARTIAL.n_layers = 12, 23  # 11 layers on the CPU


def serving(backend: str, device: str) -> list[WorkerRecord] | None:
    serves = _serves_without_devices(backend, device)
    everyone = (CPU, GPU0, GPU1, SPLIT, PARTIAL)
    return None if serves is None else [w for w in everyone if serves(w)]


def test_which_workers_answer_without_looking_at_the_devices() -> None:
    assert serving("auto", "") == [CPU, GPU0, GPU1, SPLIT, PARTIAL]  # placed by the hive
    assert serving("cpu", "") == serving("cpu", "cpu") == [CPU]
    assert serving("cuda", "") == [GPU0, GPU1, SPLIT]  # every layer on GPUs
    assert serving("cuda", "1") == serving("auto", "1") == [GPU1]


def test_a_device_named_by_uuid_or_an_invalid_one_is_left_to_the_placement() -> None:
    assert serving("cuda", "GPU-aaaa") is None
    assert serving("cpu", "3") is None  # refused there, with what exists
