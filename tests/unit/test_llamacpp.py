"""Thread counts and engine settings, without loading llama.cpp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rbee import llamacpp
from rbee.hive import probe
from rbee.llamacpp import EngineChoice, cgroup_cpu_limit


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000", 0), ("150000 100000", 2), ("50000 100000", 1), ("200000", 2), ("x y", 0)],
)
def test_cgroup_quota_rounds_up_to_whole_cpus(tmp_path: Path, text: str, cpus: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(text + "\n")
    assert cgroup_cpu_limit(path) == cpus


def test_a_missing_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent") == 0


def test_default_threads_are_physical_cores_within_affinity_and_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000")
    monkeypatch.setattr(llamacpp, "CGROUP_CPU_MAX", quota)
    monkeypatch.setattr(llamacpp.psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert llamacpp.default_threads() == 8, "hyperthreads are not counted"
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    assert llamacpp.default_threads() == 3, "taskset/CPUAffinity bounds it"
    quota.write_text("150000 100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert llamacpp.default_threads() == 2, "a container's --cpus=1.5 bounds it"


def test_the_ladder_goes_from_fastest_to_safest(tmp_path: Path) -> None:
    for name in ("haswell", "skylakex", "sapphirerapids", "x64", "sandybridge"):
        (tmp_path / f"libggml-cpu-{name}.so").write_bytes(b"")
    steps = probe.ladder(tmp_path, {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f"})
    assert steps == [
        probe.Setting("", True),
        probe.Setting("", False),
        probe.Setting("haswell", True),
        probe.Setting("haswell", False),
        probe.Setting("sandybridge", False),
        probe.Setting("x64", False),
    ]
    no_avx2 = probe.ladder(tmp_path, {"avx"})
    assert probe.Setting("haswell", False) not in no_avx2, "never a variant the CPU lacks"
    assert probe.ladder(None, set()) == [probe.Setting("", True), probe.Setting("", False)]


def test_without_a_model_nothing_is_proven_and_extra_buffer_types_stay_off(
    tmp_path: Path,
) -> None:
    choice = probe.choose(tmp_path, None, threads=3)
    assert not choice.proven and not choice.extra_bufts and choice.threads == 3
    assert "not yet probed" in choice.describe()
    assert list(tmp_path.iterdir()) == [], "an unproven verdict is not cached"


def test_a_cached_verdict_is_used_without_probing(tmp_path: Path) -> None:
    cached = EngineChoice("haswell", False, 2, "haswell", "AVX2 FMA", "a note", proven=True)
    key = llamacpp.machine_key(llamacpp.lib_dir())
    (tmp_path / f"engine-probe-{key}.json").write_text(json.dumps(cached.__dict__))
    # A probe of this path would fail: the cache answers first, with this hive's thread count.
    got = probe.choose(tmp_path, str(tmp_path / "no-such-model.gguf"), threads=5)
    assert got == EngineChoice("haswell", False, 5, "haswell", "AVX2 FMA", "a note", True)
    assert got.worker_env() == {llamacpp.CPU_VARIANT_ENV: "haswell"}


def test_the_key_changes_with_the_build_and_a_forced_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "libllama.so").write_bytes(b"one build")
    first = llamacpp.machine_key(tmp_path)
    (tmp_path / "libllama.so").write_bytes(b"another build")
    assert llamacpp.machine_key(tmp_path) != first
    again = llamacpp.machine_key(tmp_path)
    monkeypatch.setenv(llamacpp.PROBE_FAULT_ENV, "extra-bufts")
    assert llamacpp.machine_key(tmp_path) != again


def test_describe_says_what_runs_and_what_is_off() -> None:
    choice = EngineChoice("", False, 2, "sapphirerapids", "AVX2 AMX_INT8", "died by SIGSEGV", True)
    text = choice.describe()
    assert text.startswith("CPU variant sapphirerapids (AVX2 AMX_INT8), 2 threads")
    assert "extra buffer types off: died by SIGSEGV" in text
