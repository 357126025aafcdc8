"""The `rbee` command as a person runs it: real processes, real model, what they would read."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import zmq

from rbee import __version__
from rbee.errors import ExitCode, HiveUnreachable
from rbee.keeper.link import hello
from rbee.protocol.messages import PROTOCOL_VERSION
from tests.conftest import free_port
from tests.helpers import rbee_cmd, run_rbee

PIDS = re.compile(r"\(pid (\d+)")
SUMMARY = re.compile(
    r"\[done\] (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\).*first token after (\d+) ms"
)


def assert_gone(pids: list[int]) -> None:
    """Every process rbee started has exited (reaped or not, nothing still runs)."""
    deadline = time.monotonic() + 5
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"process {pid} is still running")


def test_infer_with_an_ephemeral_hive(rbee_env: dict[str, str]) -> None:
    result = run_rbee("infer", "Why is the sky blue?", "-n", "48", "-t", "0", env=rbee_env)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    for phase in (
        "[hive] no hive running here; started an ephemeral one",
        "[preflight]",
        "[worker] ",
        "[inference]",
        "[done]",
    ):
        assert phase in err, f"missing {phase!r} in:\n{err}"
    # The ephemeral hive started loading the model while the keeper looked at the LAN: the
    # keeper finds it still loading (and follows the load) or already loaded.
    if "already loading smollm2-135m-instruct" in err:
        assert "[loading] 100%" in err and "[ready] worker" in err, err
    else:
        assert "reusing worker" in err, err
    summary = SUMMARY.search(err)
    assert summary is not None, err
    assert int(summary.group(1)) >= 20 and float(summary.group(2)) > 0
    assert len(result.stdout.split()) >= 15, result.stdout
    assert "sky" in result.stdout.lower() or "blue" in result.stdout.lower()
    pids = [int(p) for p in PIDS.findall(err)]
    assert len(pids) == 2, "the hive's and the worker's pids are shown"
    assert_gone(pids)


def test_running_hive_is_used_and_its_idle_worker_reused(rbee_env: dict[str, str]) -> None:
    hive = subprocess.Popen(rbee_cmd("hive"), env=rbee_env, stderr=subprocess.PIPE, text=True)
    try:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        port = int(rbee_env["RBEE_HIVE_PORT"])
        client, _ = hello(ctx, "127.0.0.1", port, (2.0, 2.0, 4.0, 8.0))
        client.close()
        ctx.term()
        args = ("infer", "Name three colors.", "-n", "24", "-t", "0")
        first = run_rbee(*args, env=rbee_env)
        second = run_rbee(*args, env=rbee_env)
        third = run_rbee(*args, env=rbee_env)
        assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
        assert f"(127.0.0.1:{port}): its catalog has smollm2-135m-instruct" in first.stderr
        here = "[hive] using the hive running here: a worker there with a free slot"
        assert here in second.stderr, second.stderr
        assert "[worker] spawned worker" in first.stderr
        assert "[worker] reusing worker" in second.stderr, second.stderr
        # The same request on the same engine state (README: repeatability): the warm worker's
        # answers, both computed from the cached prompt, are the same.
        assert second.stdout == third.stdout and len(second.stdout.split()) >= 3
        ttft = [int(SUMMARY.search(r.stderr).group(3)) for r in (first, second)]  # type: ignore[union-attr]
        assert ttft[1] < ttft[0] / 10, f"warm first token {ttft[1]} ms vs cold {ttft[0]} ms"
        worker_pid = int(PIDS.findall(first.stderr)[0])
        ps = run_rbee("ps", env=rbee_env)
        assert ps.returncode == 0 and "idle" in ps.stdout and str(worker_pid) in ps.stdout
    finally:
        hive.send_signal(signal.SIGTERM)
        _, hive_log = hive.communicate(timeout=30)
    assert hive.returncode == 0, hive_log
    assert '"event": "hive stopped"' in hive_log
    assert_gone([worker_pid])


def test_error_codes_and_exit_codes(
    rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    unknown = run_rbee("infer", "-m", "no-such-model", "hi", env=rbee_env)
    assert unknown.returncode == ExitCode.MODEL
    assert "MODEL_NOT_FOUND" in unknown.stderr and "smollm2-135m-instruct" in unknown.stderr

    missing = run_rbee("infer", "-m", f"file:{tmp_path}/absent.gguf", "hi", env=rbee_env)
    assert missing.returncode == ExitCode.MODEL and "INVALID_MODEL" in missing.stderr

    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    not_gguf = run_rbee("infer", "-m", f"file:{text}", "hi", env=rbee_env)
    assert not_gguf.returncode == ExitCode.MODEL and "not a GGUF file" in not_gguf.stderr

    bad = run_rbee(
        "infer", "-n", "0", "-t", "9", "--top-p", "2", "--top-k", "-1", "hi", env=rbee_env
    )
    assert bad.returncode == ExitCode.USAGE and "INVALID_REQUEST" in bad.stderr
    for field in ("max_tokens", "temperature", "top_p", "top_k"):
        assert field in bad.stderr, f"{field} not named in {bad.stderr}"

    started = time.monotonic()
    port = free_port()
    unreachable = run_rbee("infer", "--node", f"127.0.0.1:{port}", "hi", env=rbee_env)
    elapsed = time.monotonic() - started
    assert unreachable.returncode == ExitCode.NETWORK and "HIVE_UNREACHABLE" in unreachable.stderr
    assert "tries" in unreachable.stderr and elapsed < 10, elapsed

    truncated = tmp_path / "truncated.gguf"
    with model_path.open("rb") as src:
        truncated.write_bytes(src.read(model_path.stat().st_size // 2))
    broken = run_rbee("infer", "-m", f"file:{truncated}", "hi", env=rbee_env)
    assert broken.returncode == ExitCode.WORKER, broken.stderr
    assert "WORKER_START_FAILED" in broken.stderr
    assert "not within the file bounds" in broken.stderr, "llama.cpp's reason is shown"
    assert_gone([int(p) for p in PIDS.findall(broken.stderr)])


def test_tokens_reach_stdout_as_they_are_made(rbee_env: dict[str, str]) -> None:
    """A paced stream (20 tokens/s) into a pipe arrives piece by piece, not at the end: the
    keeper batches its writes only while more tokens are already waiting."""
    argv = rbee_cmd("infer", "-m", "synthetic:20", "-n", "12", "x")
    proc = subprocess.Popen(argv, env=rbee_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    arrivals: list[tuple[float, bytes]] = []
    while chunk := os.read(proc.stdout.fileno(), 4096):
        arrivals.append((time.monotonic(), chunk))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    text = b"".join(c for _, c in arrivals).decode()
    assert text.split() == [f"w{i}" for i in range(12)]
    assert len(arrivals) >= 8, arrivals  # ~one read per token
    assert arrivals[-1][0] - arrivals[0][0] > 0.4, "12 tokens at 20/s take 0.55 s to come"


def test_version() -> None:
    result = subprocess.run(rbee_cmd("--version"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"rbee {__version__}" and lines[1] == f"protocol {PROTOCOL_VERSION}"
    assert lines[2].startswith("llama-cpp-python 0.3")


def test_models_import_list_rm(rbee_env: dict[str, str], model_path: Path, tmp_path: Path) -> None:
    imported = run_rbee("models", "import", str(model_path), "--name", "smol", env=rbee_env)
    assert imported.returncode == 0, imported.stderr
    assert "llama Q4_1" in imported.stdout and "context 8192" in imported.stdout
    listed = run_rbee("models", "list", env=rbee_env)
    assert re.search(r"^smol\s+llama\s+Q4_1\s+135M\s+8192", listed.stdout, re.M), listed.stdout
    ran = run_rbee(
        "infer",
        "-m",
        "smol",
        "-n",
        "4",
        "--raw",
        "-t",
        "0",
        "-",
        env=rbee_env,
        stdin="Once upon a time",
    )
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr
    removed = run_rbee("models", "rm", "smol", env=rbee_env)
    assert removed.returncode == 0 and model_path.exists()
    assert "smol " not in run_rbee("models", "list", env=rbee_env).stdout
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00")
    bad = run_rbee("models", "import", str(tmp_path / "x.gguf"), env=rbee_env)
    assert bad.returncode == ExitCode.MODEL and "INVALID_MODEL" in bad.stderr
    gone = run_rbee("models", "rm", "smol", env=rbee_env)
    assert gone.returncode == ExitCode.MODEL and "MODEL_NOT_FOUND" in gone.stderr


def test_hello_to_nothing_is_bounded() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    started = time.monotonic()
    with pytest.raises(HiveUnreachable):
        hello(ctx, "127.0.0.1", free_port(), (0.2, 0.2))
    assert time.monotonic() - started < 2
    ctx.term()


def test_config_file_environment_and_errors(rbee_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[hive]\nmax_queue = 3\nnode_name = "from-file"\n[log]\nlevel = "debug"\n')
    env = {**rbee_env, "RBEE_CONFIG": str(path), "RBEE_NODE_NAME": "from-env"}
    shown = run_rbee("config", "show", env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"hive.max_queue = 3    ({path}; RBEE_MAX_QUEUE)" in shown.stdout
    assert "hive.node_name = from-env    (environment; RBEE_NODE_NAME)" in shown.stdout
    path.write_text("[hive]\nmax_queue = -1\n")
    bad = run_rbee("hive", env=env)
    assert bad.returncode == ExitCode.USAGE
    assert str(path) in bad.stderr and "hive.max_queue: expected a whole number" in bad.stderr
    path.unlink()
    bad_env = run_rbee("nodes", env={**env, "RBEE_HIVE_PORT": "0", "RBEE_MAX_WORKERS": "x"})
    assert bad_env.returncode == ExitCode.USAGE and "Traceback" not in bad_env.stderr
    assert "RBEE_HIVE_PORT='0': expected a port number" in bad_env.stderr, bad_env.stderr
    assert "RBEE_MAX_WORKERS='x'" in bad_env.stderr and "hint: fix or unset them" in bad_env.stderr
