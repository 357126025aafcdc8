"""Backends and devices through a real hive: what runs here, on a machine without a GPU.

NEEDS THE HIVE WIRING of issue 10 (EnsureWorker.backend/device handled in rbee/hive/server.py,
`--backend/--device` in rbee/cli.py and rbee/keeper/infer.py, devices in the status). The CUDA
success path cannot run here; packaging/cuda/prove_h100.sh runs it on an H100 (GPU_RESULTS.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from rbee import gpu
from rbee.errors import BackendUnavailable, InsufficientRam, ModelNotFound
from rbee.gpu import Inventory, detect
from rbee.hive.placement import MIB, estimate_for_file
from rbee.keeper.nodes import where_text
from rbee.protocol.messages import (
    EnsureWorker,
    Explain,
    Explanation,
    HiveStatus,
    ListWorkers,
    Status,
    StopWorker,
    WorkerAssigned,
    WorkerList,
)
from rbee.transport.sockets import DealerClient
from tests.helpers import hive_in_thread, keeper, run_rbee

MODEL = "smollm2-135m-instruct"
LOAD_TIMEOUT_S = 60.0
HUGE_CTX = 1 << 20  # more than the model was trained on: cut to its 8,192 tokens
SMALL_LIMIT = "200M"  # the default model with 8,192 tokens of context needs more

pytestmark = pytest.mark.skipif(
    detect().backends != ("cpu",), reason="these tests are for a hive that has only the CPU"
)


def ensure(client: DealerClient, **fields: object) -> WorkerAssigned:
    """EnsureWorker until its final answer (an error raises as its RbeeError)."""
    rid = client.send(EnsureWorker(model=MODEL, **fields))  # type: ignore[arg-type]
    for frame in client.replies(rid, LOAD_TIMEOUT_S):
        if isinstance(frame, WorkerAssigned):
            return frame
    raise AssertionError("unreachable")


def test_cuda_on_a_gpu_less_hive_is_backend_unavailable(tmp_path: Path) -> None:
    with hive_in_thread(tmp_path) as hive, keeper(hive) as (client, _):
        with pytest.raises(BackendUnavailable) as err:
            ensure(client, backend="cuda")
        assert "cpu (" in err.value.message  # it lists what exists
        with pytest.raises(BackendUnavailable):
            ensure(client, backend="cuda", device="7")
        with pytest.raises(BackendUnavailable, match="cpu backend has no device '3'"):
            ensure(client, backend="cpu", device="3")
        with pytest.raises(BackendUnavailable, match="no GPU support"):
            ensure(client, device="3")  # auto naming a GPU means that GPU
        assert not hive.workers  # nothing was spawned, least of all a CPU worker


def test_status_lists_the_cpu_device(tmp_path: Path) -> None:
    with hive_in_thread(tmp_path) as hive, keeper(hive) as (client, _):
        status = client.request(Status(), 5)
        assert isinstance(status, HiveStatus)
        cpu = status.devices[0]
        assert (cpu.backend, cpu.usable) == ("cpu", True)
        assert cpu.cores >= 1 and cpu.free_bytes > 0
        assert all(d.backend != "cuda" or not d.usable for d in status.devices)


def test_a_context_that_cannot_fit_is_insufficient_ram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A context the RAM the hive may plan with cannot hold: refused, saying what it needs and
    what is free. (A context beyond the model's training is cut to it, as Ollama does, so the
    memory limit is what makes the model's own 8,192 tokens not fit.)"""
    monkeypatch.setenv("RBEE_MEMORY_LIMIT", SMALL_LIMIT)
    with hive_in_thread(tmp_path) as hive, keeper(hive) as (client, _):
        with pytest.raises(InsufficientRam, match=r"MiB of RAM on cpu \(.*\); [\d,]+ MiB are free"):
            ensure(client, backend="cpu", n_ctx=HUGE_CTX)
        # placed automatically: every option weighed, needed against free
        with pytest.raises(InsufficientRam, match=r"fits nowhere on test: .*cpu: needs [\d,]+ MiB"):
            ensure(client, n_ctx=HUGE_CTX)
        assert not hive.workers


@pytest.mark.model
def test_a_cpu_worker_reports_its_device_estimate_and_rss(tmp_path: Path, model_path: Path) -> None:
    with hive_in_thread(tmp_path, parallel=1) as hive, keeper(hive) as (client, _):
        assigned = ensure(client, backend="cpu")
        reply = client.request(ListWorkers(), 5)
        assert isinstance(reply, WorkerList)
        (info,) = reply.workers
        assert (info.backend, info.device, info.vram_bytes) == ("cpu", "cpu", 0)
        expected = estimate_for_file(str(model_path), 4096, "cpu")
        assert info.estimate_bytes == expected.total_bytes
        # The worker's whole RSS (interpreter, libraries, model) is above the model's part and,
        # for this small model, within a few hundred MiB of it.
        assert expected.model_bytes * 0.5 < info.rss_bytes < expected.model_bytes + 600 * MIB
        client.request(StopWorker(worker_id=assigned.worker_id), 5)


def test_rbee_infer_backend_cuda_exits_7(rbee_env: dict[str, str]) -> None:
    result = run_rbee("infer", "--backend", "cuda", "-n", "4", "hi", env=rbee_env, timeout=60)
    assert result.returncode == 7, result.stderr
    assert "error: BACKEND_UNAVAILABLE:" in result.stderr
    assert "hint:" in result.stderr
    assert result.stdout == ""


@pytest.mark.model
def test_no_backend_places_the_model_and_explain_says_why(
    tmp_path: Path, rbee_env: dict[str, str]
) -> None:
    with hive_in_thread(tmp_path, parallel=2) as hive, keeper(hive) as (client, _):
        before = client.request(Explain(model=MODEL), 5)
        assert isinstance(before, Explanation)
        assert (before.chosen, before.warm, before.model) == ("cpu", "", MODEL)
        cpu = before.options[-1]
        assert (cpu.kind, cpu.fits, cpu.slots) == ("cpu", True, 2)
        assert re.fullmatch(r"needs [\d,]+ MiB of RAM, [\d,]+ MiB free", cpu.why)
        assert "2 slots of 4096 tokens" in before.estimate
        assert not hive.workers  # explaining spawns nothing

        assigned = ensure(client)  # no backend: placed by the hive (here: the CPU)
        reply = client.request(ListWorkers(), 5)
        assert isinstance(reply, WorkerList)
        (info,) = reply.workers
        assert (info.backend, info.device, info.slots) == ("cpu", "cpu", 2)
        assert (info.gpu_layers, info.n_layers, info.layers) == (0, 0, [])
        assert where_text(info) == "cpu"

        after = client.request(Explain(model=MODEL), 5)
        assert isinstance(after, Explanation)
        assert after.warm.startswith(f"worker {assigned.worker_id} on cpu, 2 free slots")

        port = hive.front_endpoint.rsplit(":", 1)[1]
        shown = run_rbee("explain", MODEL, "--node", f"127.0.0.1:{port}", env=rbee_env)
        assert shown.returncode == 0, shown.stderr
        assert f"now: worker {assigned.worker_id} on cpu" in shown.stdout
        assert "a new worker would run on cpu" in shown.stdout
        assert re.search(r"yes cpu +cpu, 2 slots: needs [\d,]+ MiB of RAM", shown.stdout)
        client.request(StopWorker(worker_id=assigned.worker_id), 5)


def test_explain_a_model_the_hive_lacks_is_model_not_found(tmp_path: Path) -> None:
    with hive_in_thread(tmp_path) as hive, keeper(hive) as (client, _):
        with pytest.raises(ModelNotFound, match="no-such-model"):
            client.request(Explain(model="no-such-model"), 5)
        assert not hive.workers


def test_a_hive_pinned_to_cuda_never_places_a_request_on_its_cpu(tmp_path: Path) -> None:
    with hive_in_thread(tmp_path, backend="cuda") as hive, keeper(hive) as (client, _):
        with pytest.raises(BackendUnavailable, match="no GPU support"):
            ensure(client)  # names no backend: the hive's pin decides
        with pytest.raises(BackendUnavailable, match="no GPU support"):
            client.request(Explain(model=MODEL), 5)
        assert not hive.workers


def test_explain_with_no_hive_in_reach_says_what_infer_would_do(rbee_env: dict[str, str]) -> None:
    shown = run_rbee("explain", MODEL, env=rbee_env, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "no hive in reach: `rbee infer` would start one on this machine" in shown.stdout


@pytest.mark.model
def test_a_request_for_a_free_slot_asks_nvml_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hive's one loop relays every token; NVML's queries take milliseconds each."""
    calls: list[int] = []
    real_detect = gpu.detect

    def counted(**kwargs: Any) -> Inventory:
        calls.append(1)
        return real_detect(**kwargs)

    monkeypatch.setattr(gpu, "detect", counted)
    with hive_in_thread(tmp_path, parallel=2) as hive, keeper(hive) as (client, _):
        first = ensure(client)  # placed: the devices were looked at
        assert calls
        asked = len(calls)
        again = ensure(client)
        assert (again.worker_id, again.reused) == (first.worker_id, True)
        assert len(calls) == asked
        client.request(StopWorker(worker_id=first.worker_id), 5)
