"""The engine probe and the engine's settings, with the real model and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import zmq

from rbee.errors import WorkerCrashed
from rbee.hive import probe
from rbee.keeper.link import hello
from rbee.keeper.stream import JobStream
from rbee.llamacpp import PROBE_FAULT_ENV, default_threads
from rbee.protocol.messages import GenerateParams, StreamError
from tests.helpers import hive_in_thread, keeper, rbee_cmd, run_rbee
from tests.integration.test_hive_worker import ensure, start

READY_TIMEOUT_S = 60.0


def test_the_probe_proves_a_setting_and_caches_it(tmp_path: Path, model_path: Path) -> None:
    choice = probe.choose(tmp_path, str(model_path), threads=2)
    assert choice.proven and choice.threads == 2 and choice.features
    if not choice.extra_bufts:
        assert "extra buffer types: died by" in choice.note or "exited" in choice.note, choice
    cached = list(tmp_path.glob("engine-probe-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["proven"]
    # The next hive start reads the verdict instead of probing (this path would fail to load).
    again = probe.choose(tmp_path, str(tmp_path / "missing.gguf"), threads=3)
    assert again == probe.EngineChoice(**{**choice.__dict__, "threads": 3})


def test_a_crashing_fast_path_is_turned_off_and_the_hive_serves(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    """The probe dies by SIGSEGV with extra buffer types (forced): workers load without them,
    the hive serves, its status and `rbee nodes` say so, and the next start does not probe."""
    env = {**rbee_env, PROBE_FAULT_ENV: "extra-bufts", "RBEE_CACHE_DIR": str(tmp_path / "cache")}
    for start_no in (1, 2):
        hive = subprocess.Popen(rbee_cmd("hive"), env=env, stderr=subprocess.PIPE, text=True)
        try:
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            client, _ = hello(ctx, "127.0.0.1", int(env["RBEE_HIVE_PORT"]), (5.0, 10.0, 20.0))
            client.close()
            ctx.term()
            nodes = run_rbee("nodes", env=env)
            assert nodes.returncode == 0, nodes.stderr
            assert (
                "extra buffer types off: the best CPU variant with extra buffer types: "
                "died by SIGSEGV" in nodes.stdout
            ), nodes.stdout
            ran = run_rbee("infer", "-n", "8", "-t", "0", "Hello", env=env)
            assert ran.returncode == 0 and "[done] 8 tokens" in ran.stderr, ran.stderr
            workers = [p for p in psutil.Process(hive.pid).children() if "worker" in p.cmdline()]
            assert len(workers) == 1
            argv = workers[0].cmdline()
            assert "--no-extra-bufts" in argv
            assert argv[argv.index("--threads") + 1] == str(default_threads())
        finally:
            hive.send_signal(signal.SIGTERM)
            _, log = hive.communicate(timeout=30)
        assert hive.returncode == 0, log
        probed = '"event": "engine probe failed"' in log
        assert probed == (start_no == 1), f"start {start_no}: probed={probed}\n{log[-3000:]}"


def test_a_worker_killed_by_a_signal_before_its_first_token_says_what_ran(
    tmp_path: Path,
) -> None:
    """WORKER_CRASHED names the signal and the engine setting, with a hint."""
    with hive_in_thread(tmp_path) as hive, keeper(hive) as (client, sub):
        assigned, _ = ensure(client, "synthetic:0.2")  # the first token comes after 5 s
        job_id = f"j-{time.monotonic_ns()}"
        sub.subscribe(job_id)
        start(client, job_id, assigned.worker_id, GenerateParams(prompt="hi", max_tokens=4))
        worker = hive.workers[assigned.worker_id]
        deadline = time.monotonic() + 5
        while job_id not in worker.job_ids and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGSEGV)
        frames = list(JobStream(client, sub, job_id))
    end = frames[-1]
    assert isinstance(end, StreamError) and end.code == WorkerCrashed.code, end
    assert "killed by SIGSEGV while the engine ran CPU" in end.message
    assert "before its first token" in end.message and "RBEE_CPU_VARIANT=haswell" in end.suggestion
