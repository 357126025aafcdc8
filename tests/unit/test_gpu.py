"""Device detection (rbee.gpu) against a fake NVML, and how a worker is confined to its device.

No test here needs a GPU: NVML is replaced by a small fake that behaves like pynvml (including
its failures), and the one test on the real machine checks that a GPU-less machine detects only
its CPU, without raising.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from rbee import gpu
from rbee.cli import build_parser
from rbee.errors import BackendUnavailable, InvalidRequest
from rbee.gpu import placement_label
from rbee.hive.supervisor import device_env
from rbee.keeper.nodes import where_text
from rbee.protocol.codec import encode
from rbee.protocol.messages import Token, WorkerInfo
from rbee.worker.args import WorkerArgs
from rbee.worker.engine import ALL_LAYERS, gpu_params
from rbee.worker.main import TokenFrames, main_gpu

GIB = 1 << 30
H100_UUID = "GPU-1b2c3d4e-0000-1111-2222-333344445555"
A100_UUID = "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"


class NVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


@dataclass
class FakeGpu:
    name: str
    uuid: str
    total: int
    free: int
    mig: int | None = None  # None: the GPU does not support MIG
    broken: bool = False
    procs: list[tuple[int, int | None]] = field(default_factory=list)  # pid, used bytes


class FakeNvml:
    """The part of pynvml rbee.gpu uses; names come back as bytes, as older pynvml does."""

    def __init__(self, gpus: list[FakeGpu], count_fails: bool = False) -> None:
        self.gpus = gpus
        self.count_fails = count_fails

    def nvmlDeviceGetCount(self) -> int:
        if self.count_fails:
            raise NVMLError("Unknown Error")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        if handle.broken:
            raise NVMLError("GPU is lost")
        return SimpleNamespace(
            total=handle.total, free=handle.free, used=handle.total - handle.free
        )

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> bytes:
        return handle.uuid.encode()

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return handle.name.encode()

    def nvmlDeviceGetMigMode(self, handle: FakeGpu) -> tuple[int, int]:
        if handle.mig is None:
            raise NVMLError("Not Supported")
        return handle.mig, handle.mig

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.procs]


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu("NVIDIA H100 80GB HBM3", H100_UUID, 80 * GIB, 70 * GIB),
            FakeGpu("NVIDIA A100-SXM4-40GB", A100_UUID, 40 * GIB, 39 * GIB),
        ]
    )


def test_detects_every_gpu_with_memory_and_names_given_as_bytes() -> None:
    inv = gpu.detect(nvml=two_gpus(), gpu_offload=True, environ={})
    assert [(d.index, d.uuid, d.name) for d in inv.cuda] == [
        (0, H100_UUID, "NVIDIA H100 80GB HBM3"),
        (1, A100_UUID, "NVIDIA A100-SXM4-40GB"),
    ]
    assert inv.cuda[0].total_bytes == 80 * GIB and inv.cuda[0].free_bytes == 70 * GIB
    assert inv.backends == ("cpu", "cuda")
    assert inv.announce_text() == "cpu,cuda"
    assert inv.cuda_note == ""
    assert inv.cpu.cores >= 1 and inv.cpu.ram_total_bytes > 0


def test_gpus_without_a_gpu_build_are_listed_but_not_a_backend() -> None:
    inv = gpu.detect(nvml=two_gpus(), gpu_offload=False, environ={})
    assert len(inv.cuda) == 2
    assert inv.backends == ("cpu",)
    assert inv.cuda_note == gpu.NO_GPU_BUILD_NOTE
    infos = inv.device_infos()
    assert [i.backend for i in infos] == ["cpu", "cuda", "cuda"]
    assert not infos[1].usable and infos[1].note == gpu.NO_GPU_BUILD_NOTE


def test_device_infos_carry_the_cpu_first_and_every_gpu() -> None:
    infos = gpu.detect(nvml=two_gpus(), gpu_offload=True, environ={}).device_infos()
    cpu, h100, a100 = infos
    assert cpu.backend == "cpu" and cpu.cores >= 1 and cpu.usable
    assert (h100.index, h100.uuid, h100.free_bytes, h100.usable) == (0, H100_UUID, 70 * GIB, True)
    assert a100.name == "NVIDIA A100-SXM4-40GB"


def test_nvml_failing_to_count_means_no_gpu_and_a_note() -> None:
    inv = gpu.detect(nvml=FakeNvml([], count_fails=True), gpu_offload=True, environ={})
    assert inv.cuda == ()
    assert inv.backends == ("cpu",)
    assert "Unknown Error" in inv.cuda_note


def test_a_gpu_that_fails_its_query_is_left_out_and_named() -> None:
    nvml = two_gpus()
    nvml.gpus[0].broken = True
    inv = gpu.detect(nvml=nvml, gpu_offload=True, environ={})
    assert [d.index for d in inv.cuda] == [1]
    assert "GPU 0: GPU is lost" in inv.cuda_note


def test_a_mig_gpu_is_listed_as_unusable() -> None:
    nvml = two_gpus()
    nvml.gpus[1].mig = 1
    inv = gpu.detect(nvml=nvml, gpu_offload=True, environ={})
    assert inv.cuda[0].note == "" and "MIG" in inv.cuda[1].note
    assert not inv.device_infos()[2].usable


def test_the_hives_own_cuda_visible_devices_hides_gpus() -> None:
    devices = gpu.detect(nvml=two_gpus(), gpu_offload=True, environ={}).cuda
    assert gpu.visible(devices, None) == devices
    assert gpu.visible(devices, "1") == (devices[1],)
    assert gpu.visible(devices, "GPU-9f8e7d6c") == (devices[1],)  # a UUID prefix, as CUDA takes
    assert gpu.visible(devices, "9f8e") == (devices[1],)
    assert gpu.visible(devices, "1,0") == (devices[1], devices[0])
    assert gpu.visible(devices, "") == ()
    assert gpu.visible(devices, "-1") == ()
    assert gpu.visible(devices, "0,7,1") == (devices[0],)  # CUDA stops at the first bad entry
    inv = gpu.detect(nvml=two_gpus(), gpu_offload=True, environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert [d.index for d in inv.cuda] == [1]


def test_process_vram_sums_a_process_over_gpus() -> None:
    nvml = two_gpus()
    nvml.gpus[0].procs = [(100, 900 * (1 << 20)), (200, 5 * GIB)]
    nvml.gpus[1].procs = [(100, 100 * (1 << 20))]
    assert gpu.process_vram_bytes(100, nvml=nvml) == 1000 * (1 << 20)
    assert gpu.process_vram_bytes(200, nvml=nvml) == 5 * GIB
    assert gpu.process_vram_bytes(300, nvml=nvml) is None  # not listed is not "uses nothing"
    nvml.gpus[1].procs = [(300, None)]  # NVML without per-process accounting
    assert gpu.process_vram_bytes(300, nvml=nvml) == 0
    assert gpu.device_used_bytes(0, nvml=nvml) == 10 * GIB
    assert gpu.device_used_bytes(5, nvml=nvml) is None


def test_describe_lists_what_exists() -> None:
    text = gpu.detect(nvml=two_gpus(), gpu_offload=True, environ={}).describe()
    assert "cpu (" in text and "cuda:0 NVIDIA H100 80GB HBM3 (70.0 GiB free of 80.0)" in text


def test_this_machine_detects_without_raising() -> None:
    """The real probes: on a machine without a GPU there is no CUDA device and no crash."""
    inv = gpu.detect()
    assert inv.cpu.cores >= 1
    assert "cpu" in inv.backends
    if not inv.cuda:
        assert inv.cuda_note  # says why: no nvidia-ml-py, or no driver
        assert inv.device_infos()[0].backend == "cpu"


# --------------------------------------------------------------------------- worker side


class FakeLlamaCpp:
    LLAMA_SPLIT_MODE_NONE = 0
    LLAMA_SPLIT_MODE_LAYER = 1

    def __init__(self, offload: bool) -> None:
        self.offload = offload

    def llama_supports_gpu_offload(self) -> bool:
        return self.offload


def test_cuda_puts_every_layer_on_one_gpu() -> None:
    params = gpu_params(FakeLlamaCpp(offload=True), "cuda", 0)
    assert params == {"n_gpu_layers": ALL_LAYERS, "main_gpu": 0, "split_mode": 0}
    assert gpu_params(FakeLlamaCpp(offload=True), "cpu", 0) == {"n_gpu_layers": 0}


def test_a_partial_offload_and_a_split_over_gpus() -> None:
    llama = FakeLlamaCpp(offload=True)
    partial = gpu_params(llama, "cuda", 0, gpu_layers=20)
    assert partial == {"n_gpu_layers": 20, "main_gpu": 0, "split_mode": 0}
    split = gpu_params(llama, "cuda", 0, gpu_layers=ALL_LAYERS, layers=[16, 15])
    assert split == {
        "n_gpu_layers": ALL_LAYERS,
        "main_gpu": 0,
        "split_mode": 1,  # llama.cpp's layer split, in these proportions
        "tensor_split": [16.0, 15.0],
    }


def test_cuda_on_a_cpu_build_is_refused_not_run_on_the_cpu() -> None:
    with pytest.raises(BackendUnavailable, match="no GPU support"):
        gpu_params(FakeLlamaCpp(offload=False), "cuda", 0)
    with pytest.raises(BackendUnavailable):
        gpu_params(FakeLlamaCpp(offload=True), "metal", 0)


def test_a_worker_sees_its_gpu_as_device_zero() -> None:
    assert main_gpu("3", {"CUDA_VISIBLE_DEVICES": H100_UUID}) == 0
    assert main_gpu("3", {}) == 3  # started by hand, every GPU visible
    assert main_gpu("", {}) == 0
    assert main_gpu("1", {"CUDA_VISIBLE_DEVICES": "0,1"}) == 1


def test_the_supervisor_confines_each_worker_to_its_device() -> None:
    assert device_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    env = device_env("cuda", "1", A100_UUID)
    assert env == {"CUDA_VISIBLE_DEVICES": A100_UUID, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert device_env("cuda", "2")["CUDA_VISIBLE_DEVICES"] == "2"


def test_worker_argv_names_the_backend_only_off_the_cpu() -> None:
    cpu = WorkerArgs("w-1", "/m.gguf", "tcp://c", "tcp://s", 2048, 1).argv()
    assert "--backend" not in cpu  # a CPU worker's command line is what it always was
    cuda = WorkerArgs("w-1", "/m.gguf", "tcp://c", "tcp://s", 2048, 1, "cuda", "1").argv()
    assert cuda[-4:] == ["--backend", "cuda", "--device", "1"]


@pytest.mark.parametrize(
    "args",
    [
        WorkerArgs("w-1", "/m.gguf", "tcp://c", "tcp://s", 2048, 77),
        WorkerArgs("w-2", "/m b.gguf", "tcp://c", "tcp://s", 0, 9, "cuda", "3", 6, False),
        WorkerArgs("w-3", "/m.gguf", "c", "s", 0, 9, "cuda", "0+1", layers=(16, 15)),
        WorkerArgs("w-4", "/m.gguf", "c", "s", 0, 9, "cuda", "2", gpu_layers=20, slots=4),
        WorkerArgs("w-5", "/m.gguf", "c", "s", 0, 9, stream_interval_ms=0),
        WorkerArgs("w-6", "/m.gguf", "c", "s", 0, 9, gpu_layers=14, rpc=("127.0.0.1:5000",)),
        WorkerArgs(
            "w-7",
            "/m.gguf",
            "c",
            "s",
            0,
            9,
            gpu_layers=20,
            layers=(12, 8),
            rpc=("127.0.0.1:1",) * 2,
        ),
    ],
)
def test_the_worker_reads_back_what_the_hive_wrote(args: WorkerArgs) -> None:
    """Both sides of `rbee worker`'s command line: the hive's argv, the worker's parser."""
    parsed = build_parser().parse_args(["worker", *args.argv()])
    assert WorkerArgs.parse(parsed) == args


def test_fast_token_frames_are_the_codecs_bytes() -> None:
    frames = TokenFrames("j-0123456789abcdef")
    cases = [(0, "", -1, 1), (7, " héllo", 1234, 1), (8, " a b", 9, 2), (9, "x" * 2000, 5, 30)]
    for seq, text, token_id, count in cases:
        frame = Token(job_id=frames.job_id, seq=seq, text=text, token_id=token_id, count=count)
        assert frames.encode(seq, text, token_id, count) == encode(frame)
    with pytest.raises(InvalidRequest):
        TokenFrames("../etc")


def test_placement_labels() -> None:
    assert placement_label("cpu", "cpu", (), 31) == "cpu"
    assert placement_label("cuda", "0", (), 31) == "cuda:0 31/31"
    assert placement_label("cuda", "0+1", (16, 15), 31) == "cuda:0+1 16+15/31"
    assert placement_label("cuda", "0", (22,), 31, on_cpu=True) == "cpu+cuda:0 9+22/31"
    assert placement_label("cuda", "0+1", (10, 8), 31, on_cpu=True) == "cpu+cuda:0+1 13+10+8/31"
    assert placement_label("cuda", "0") == "cuda:0"  # the layer count unknown


def test_ps_shows_where_each_workers_layers_are() -> None:
    def info(**fields: object) -> WorkerInfo:
        base = dict(worker_id="w-1", model="m", pid=1, state="idle", last_activity=1.0)
        return WorkerInfo(**{**base, **fields})  # type: ignore[arg-type]

    assert where_text(info(backend="cpu", device="cpu")) == "cpu"
    whole = info(backend="cuda", device="0", gpu_layers=31, n_layers=31)
    assert where_text(whole) == "cuda:0 31/31"
    split = info(backend="cuda", device="0+1", gpu_layers=31, n_layers=31, layers=[16, 15])
    assert where_text(split) == "cuda:0+1 16+15/31"
    partial = info(backend="cuda", device="0", gpu_layers=22, n_layers=31)
    assert where_text(partial) == "cpu+cuda:0 9+22/31"


@pytest.mark.parametrize("endpoint", ["10.0.0.2:50052", "0.0.0.0:1", "localhost:1", "127.0.0.1:0"])
def test_a_worker_reaches_rpc_servers_on_loopback_only(endpoint: str) -> None:
    argv = WorkerArgs("w-1", "/m.gguf", "c", "s", 0, 9, gpu_layers=3, rpc=(endpoint,)).argv()
    with pytest.raises(InvalidRequest, match="loopback address and port"):
        WorkerArgs.parse(build_parser().parse_args(["worker", *argv]))
