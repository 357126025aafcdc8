"""Device choice and the memory estimate (rbee.hive.placement): pure functions, no GPU needed.

The estimate is checked against what llama.cpp itself reports for the default model on the CPU
(its KV cache and compute buffer sizes, read from its verbose load log), so a change of formula
that drifts from llama.cpp fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.errors import BackendUnavailable, InsufficientRam, InsufficientVram
from rbee.gguf import read_gguf_info
from rbee.gpu import CpuInfo, CudaDevice, Inventory
from rbee.hive import placement
from rbee.hive.placement import MIB, MemoryEstimate, ModelShape, Placement

GIB = 1 << 30
H100 = CudaDevice(0, "GPU-aaaa1111-0000", "NVIDIA H100 80GB HBM3", 80 * GIB, 20 * GIB)
A100 = CudaDevice(1, "GPU-bbbb2222-0000", "NVIDIA A100-SXM4-40GB", 40 * GIB, 39 * GIB)
L4 = CudaDevice(2, "GPU-bbbb3333-0000", "NVIDIA L4", 24 * GIB, 39 * GIB)
CPU = CpuInfo(cores=16, ram_total_bytes=128 * GIB, ram_free_bytes=100 * GIB)

SMOLLM2 = {  # the default model's header (SmolLM2-135M-Instruct)
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.vocab_size": 49152,
}
TINYLLAMA = {
    "general.architecture": "llama",
    "llama.block_count": 22,
    "llama.embedding_length": 2048,
    "llama.feed_forward_length": 5632,
    "llama.attention.head_count": 32,
    "llama.attention.head_count_kv": 4,
    "tokenizer.ggml.tokens": 32000,  # rbee.gguf records an array as its length
}


def inventory(*gpus: CudaDevice, offload: bool = True, note: str = "") -> Inventory:
    return Inventory(cpu=CPU, cuda=gpus, gpu_offload=offload, cuda_note=note)


# --------------------------------------------------------------------------- device choice


def test_cpu_is_always_there() -> None:
    where = placement.choose_device(inventory(), "cpu")
    assert (where.backend, where.device, where.free_bytes) == ("cpu", "cpu", 100 * GIB)
    assert where.index == -1 and where.label == "cpu" and where.memory_kind == "RAM"
    assert placement.choose_device(inventory(), "cpu", "cpu").device == "cpu"


def test_cuda_without_a_device_takes_the_most_free_memory() -> None:
    where = placement.choose_device(inventory(H100, A100), "cuda")
    assert (where.backend, where.device, where.uuid) == ("cuda", "1", A100.uuid)
    assert where.free_bytes == 39 * GIB and where.index == 1
    assert where.label == "cuda:1 (NVIDIA A100-SXM4-40GB)"


def test_a_tie_in_free_memory_goes_to_the_lowest_index() -> None:
    assert placement.choose_device(inventory(L4, A100), "cuda").device == "1"


def test_cuda_by_index_or_uuid() -> None:
    inv = inventory(H100, A100)
    assert placement.choose_device(inv, "cuda", "0").uuid == H100.uuid
    assert placement.choose_device(inv, "cuda", A100.uuid).device == "1"
    assert placement.choose_device(inv, "cuda", "aaaa1111").device == "0"  # a unique prefix
    assert placement.choose_device(inv, "cuda", "GPU-AAAA").device == "0"


def test_an_unknown_device_lists_what_exists() -> None:
    with pytest.raises(BackendUnavailable) as err:
        placement.choose_device(inventory(H100, A100), "cuda", "7", node="alpha")
    assert "no CUDA device '7' on alpha" in err.value.message
    assert "0 (GPU-aaaa1111-0000), 1 (GPU-bbbb2222-0000)" in err.value.message
    assert err.value.code == "BACKEND_UNAVAILABLE" and err.value.exit_code == 7
    with pytest.raises(BackendUnavailable):
        placement.choose_device(inventory(H100, A100, L4), "cuda", "bbbb")  # ambiguous prefix


def test_a_build_without_gpu_support_never_falls_back_to_the_cpu() -> None:
    with pytest.raises(BackendUnavailable, match="no GPU support") as err:
        placement.choose_device(inventory(H100, offload=False), "cuda")
    assert "cuda:0 NVIDIA H100" in err.value.message  # what exists is listed
    assert "packaging/cuda/build.sh" in err.value.suggestion


def test_no_gpu_at_all() -> None:
    inv = inventory(note="no NVIDIA driver (NVML Shared Library Not Found)")
    with pytest.raises(BackendUnavailable, match="no usable CUDA GPU on beta") as err:
        placement.choose_device(inv, "cuda", node="beta")
    assert "NVML Shared Library Not Found" in err.value.message


def test_only_a_mig_gpu_is_no_usable_gpu() -> None:
    mig = CudaDevice(0, "GPU-cccc", "NVIDIA A100", 80 * GIB, 80 * GIB, note="MIG is enabled")
    with pytest.raises(BackendUnavailable, match="no usable CUDA GPU"):
        placement.choose_device(inventory(mig), "cuda")


def test_bad_cpu_device_and_unknown_backend() -> None:
    with pytest.raises(BackendUnavailable, match="cpu backend has no device"):
        placement.choose_device(inventory(), "cpu", "3")
    with pytest.raises(BackendUnavailable, match="no metal backend"):
        placement.choose_device(inventory(), "metal")


def test_which_workers_serve_a_request() -> None:
    gpu1 = Placement(backend="cuda", device="1", uuid=A100.uuid)
    assert placement.serves("cuda", "1", gpu1, "")
    assert placement.serves("cuda", "0", gpu1, "")  # no device named: any GPU worker will do
    assert not placement.serves("cuda", "0", gpu1, "1")
    assert placement.serves("cuda", "1", gpu1, A100.uuid)
    assert not placement.serves("cpu", "cpu", gpu1, "")  # never a CPU worker for a GPU request
    cpu = Placement(backend="cpu", device="cpu")
    assert placement.serves("cpu", "cpu", cpu, "") and not placement.serves("cuda", "0", cpu, "")


# --------------------------------------------------------------------------- memory estimate


def test_shape_from_the_header() -> None:
    shape = placement.model_shape(SMOLLM2)
    assert shape == ModelShape(30, 576, 9, 3, 64, 64, 1536, 49152)
    tiny = placement.model_shape(TINYLLAMA)
    assert tiny is not None and (tiny.head_dim_k, tiny.n_vocab) == (64, 32000)
    assert placement.model_shape({"general.architecture": "llama"}) is None
    assert placement.model_shape({}) is None


def test_key_and_value_lengths_override_the_head_dimension() -> None:
    header = SMOLLM2 | {"llama.attention.key_length": 128, "llama.attention.value_length": 96}
    shape = placement.model_shape(header)
    assert shape is not None and (shape.head_dim_k, shape.head_dim_v) == (128, 96)


def test_kv_cache_is_context_times_layers_times_kv_width_for_k_and_v_in_f16() -> None:
    shape = placement.model_shape(SMOLLM2)
    assert shape is not None
    # llama.cpp: "KV buffer size = 45.00 MiB" at 2048 tokens, 90.00 at 4096, 180.00 at 8192
    assert placement.kv_cache_bytes(shape, 2048) == 45 * MIB
    assert placement.kv_cache_bytes(shape, 4096) == 90 * MIB
    assert placement.kv_cache_bytes(shape, 8192) == 180 * MIB
    assert placement.kv_cache_bytes(shape, 2000) == 45 * MIB  # cells round up to 256
    assert placement.kv_cache_bytes(shape, 4096) == 4096 * 30 * (3 * 64) * 2 * 2


def test_compute_buffer_matches_llama_cpp_for_the_default_model() -> None:
    shape = placement.model_shape(SMOLLM2)
    assert shape is not None
    # llama.cpp 0.3.36 on the CPU: "CPU compute buffer size = 99.38 MiB" (2048), 166.38 (8192)
    assert placement.compute_bytes(shape, 2048) / MIB == pytest.approx(99.38, abs=0.01)
    assert placement.compute_bytes(shape, 8192) / MIB == pytest.approx(166.38, abs=0.01)


def test_estimate_adds_weights_kv_compute_and_the_cuda_runtime() -> None:
    cpu = placement.estimate(SMOLLM2, 100 * MIB, 4096, "cpu")
    assert cpu.weights_bytes == 100 * MIB and cpu.kv_bytes == 90 * MIB
    assert cpu.runtime_bytes == 0
    assert cpu.total_bytes == cpu.model_bytes == 100 * MIB + 90 * MIB + cpu.compute_bytes
    cuda = placement.estimate(SMOLLM2, 100 * MIB, 4096, "cuda")
    assert cuda.total_bytes == cpu.total_bytes + placement.CUDA_RUNTIME_BYTES
    assert "weights 100 + KV cache 90 + compute 99" in cuda.describe()
    assert "runtime 600 MiB, 1 slot of 4096 tokens" in cuda.describe()
    assert cpu.slots == cuda.slots == 1


def test_each_slot_adds_its_own_kv_cache_and_the_compute_buffer_spans_them_all() -> None:
    one = placement.estimate(SMOLLM2, 100 * MIB, 4096, "cpu")
    four = placement.estimate(SMOLLM2, 100 * MIB, 4096, "cpu", slots=4)
    assert four.slots == 4 and four.n_ctx == 4096  # the context stays per slot
    assert four.kv_bytes == 4 * one.kv_bytes == 360 * MIB  # slots × n_ctx cells, non-unified
    shape = placement.model_shape(SMOLLM2)
    assert shape is not None
    # the upper bound: attention against every slot's cells, as one context of 4 × 4096 would
    assert four.compute_bytes == placement.compute_bytes(shape, 4 * 4096) > one.compute_bytes
    assert placement.compute_bytes(shape, 4096, slots=4) == four.compute_bytes
    assert four.weights_bytes == one.weights_bytes  # one copy of the weights
    assert four.describe().endswith(
        f"(weights 100 + KV cache 360 + compute {four.compute_bytes // MIB} MiB, "
        "4 slots of 4096 tokens)"
    )


def test_fit_slots_takes_auto_slots_or_as_many_as_fit_never_below_one() -> None:
    def estimate(slots: int) -> MemoryEstimate:
        return placement.estimate(SMOLLM2, 100 * MIB, 4096, "cpu", slots)

    sizes = {n: estimate(n).total_bytes for n in range(1, 9)}
    assert placement.AUTO_SLOTS == 4
    assert placement.fit_slots(estimate, 100 * GIB).slots == 4  # automatic: 4, not more
    assert placement.fit_slots(estimate, sizes[4]).slots == 4  # exactly fits
    assert placement.fit_slots(estimate, sizes[4] - 1).slots == 3
    assert placement.fit_slots(estimate, sizes[2]).slots == 2
    assert placement.fit_slots(estimate, sizes[2] - 1).slots == 1
    tiny = placement.fit_slots(estimate, 1)  # nothing fits: 1 slot, which check_fits refuses
    assert tiny.slots == 1
    with pytest.raises(InsufficientRam, match=r"1 slot of 4096 tokens\); 0 MiB are free"):
        placement.check_fits(tiny, Placement(backend="cpu", device="cpu", free_bytes=1), "m")
    # explicit: as asked, whether it fits or not (a --parallel that does not fit is refused)
    assert placement.fit_slots(estimate, 100 * GIB, parallel=8).slots == 8
    explicit = placement.fit_slots(estimate, sizes[2], parallel=3)
    assert explicit.slots == 3 and explicit.total_bytes == sizes[3] > sizes[2]
    with pytest.raises(InsufficientRam, match="3 slots of 4096 tokens"):
        where = Placement(backend="cpu", device="cpu", free_bytes=sizes[2])
        placement.check_fits(explicit, where, "m")


def test_an_unknown_shape_falls_back_to_weights_and_a_margin() -> None:
    est = placement.estimate({"general.architecture": "mamba"}, 500 * MIB, 4096, "cpu")
    assert not est.shape_known
    assert est.total_bytes == 500 * MIB + placement.UNKNOWN_SHAPE_MARGIN_BYTES
    assert "(shape unknown)" in est.describe()
    two = placement.estimate({"general.architecture": "mamba"}, 500 * MIB, 4096, "cpu", 2)
    assert two.slots == 2 and "2 slots of 4096 tokens" in two.describe()


def test_estimate_for_a_real_file_and_for_none(model_path: Path) -> None:
    est = placement.estimate_for_file(str(model_path), 4096, "cpu")
    assert est.shape_known and est.weights_bytes == model_path.stat().st_size
    assert est.kv_bytes == 90 * MIB
    assert placement.model_shape(read_gguf_info(model_path).metadata) == ModelShape(
        30, 576, 9, 3, 64, 64, 1536, 49152
    )
    missing = placement.estimate_for_file("/no/such/file.gguf", 4096, "cuda")
    assert missing.total_bytes == 0  # synthetic: and vanished files need nothing here
    four = placement.estimate_for_file(str(model_path), 4096, "cpu", slots=4)
    assert four.slots == 4 and four.kv_bytes == 360 * MIB
    assert placement.estimate_for_file("/no/such/file.gguf", 4096, "cpu", 4).slots == 4


def test_estimate_for_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    est = placement.estimate_for_file(str(junk), 4096, "cpu")
    assert not est.shape_known and est.weights_bytes == 1100


def test_check_fits_refuses_with_needed_and_free_in_mib() -> None:
    needed = MemoryEstimate(
        weights_bytes=2000 * MIB,
        kv_bytes=500 * MIB,
        compute_bytes=100 * MIB,
        runtime_bytes=0,
        n_ctx=4096,
    )
    gpu0 = Placement(
        backend="cuda", device="0", uuid=H100.uuid, name=H100.name, free_bytes=1024 * MIB
    )
    with pytest.raises(InsufficientVram) as err:
        placement.check_fits(needed, gpu0, "tinyllama", node="alpha")
    assert err.value.message == (
        "tinyllama needs about 2,600 MiB of GPU memory on cuda:0 (NVIDIA H100 80GB HBM3) "
        "(weights 2000 + KV cache 500 + compute 100 MiB, 1 slot of 4096 tokens); 1,024 MiB are "
        "free on alpha"
    )
    assert err.value.code == "INSUFFICIENT_VRAM" and err.value.exit_code == 7
    ram = Placement(backend="cpu", device="cpu", free_bytes=2000 * MIB)
    with pytest.raises(
        InsufficientRam, match=r"2,600 MiB of RAM on cpu \(.*\); 2,000 MiB are free"
    ):
        placement.check_fits(needed, ram, "tinyllama")
    placement.check_fits(needed, Placement(backend="cpu", device="cpu", free_bytes=4 * GIB), "x")
