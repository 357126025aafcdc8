"""Failures and lifecycle with real processes: crashes, hangs, Ctrl-C, queues, keep-alive,
draining and a lost hive. Each test runs `rbee hive` and `rbee infer` as a person would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import psutil
import pytest
import zmq

from rbee.errors import ExitCode
from rbee.keeper.link import hello
from tests.e2e.test_cli import PIDS, SUMMARY, assert_gone
from tests.helpers import rbee_cmd, run_rbee

LONG = ("--raw", "-t", "0", "--ignore-eos", "-n", "3000", "Once upon a time")
SHORT = ("--raw", "-t", "0", "-n", "12", "The three primary colors are")


@contextmanager
def running_hive(env: dict[str, str], *flags: str) -> Iterator[subprocess.Popen[str]]:
    """`rbee hive FLAGS` until the test ends (SIGTERM, then it must exit 0)."""
    hive = subprocess.Popen(rbee_cmd("hive", *flags), env=env, stderr=subprocess.PIPE, text=True)
    try:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client, _ = hello(ctx, "127.0.0.1", int(env["RBEE_HIVE_PORT"]), (2.0, 2.0, 4.0, 8.0))
        client.close()
        ctx.term()
        yield hive
    finally:
        if hive.poll() is None:
            hive.send_signal(signal.SIGTERM)
        hive.communicate(timeout=30)


class Keeper:
    """`rbee infer` in the background, its stderr read line by line as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            rbee_cmd("infer", *args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.chunks: list[str] = []
        assert self.proc.stderr is not None and self.proc.stdout is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.chunks), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe: IO[str], into: list[str]) -> None:
        """Everything the pipe gives, as it comes (tokens arrive without newlines), then close it
        (at once, not when the Popen is collected: a failed test's traceback keeps it)."""
        with pipe:
            while chunk := pipe.read(1):
                into.append(chunk)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """The first stderr line containing ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = "".join(self.lines)
            for line in seen[: seen.rfind("\n") + 1].splitlines():  # complete lines only
                if text in line:
                    return line
            if self.proc.poll() is not None and not self._readers[0].is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared in:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once the keeper ends."""
        self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(5)
        return self.proc.returncode, "".join(self.chunks), "".join(self.lines)


def worker_pid(line: str) -> int:
    return int(PIDS.findall(line)[0])


def some_text_printed(keeper: Keeper) -> None:
    """Wait until the keeper printed a few words of the answer."""
    deadline = time.monotonic() + 30
    while len("".join(keeper.chunks).split()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)


def assert_partial_saved(out: str, err: str) -> None:
    """The keeper named the file holding what it printed, and the file holds exactly that."""
    match = re.search(r"(\d+) of 3000 tokens arrived; the partial text is saved in (\S+)", err)
    assert match is not None, err
    assert Path(match.group(2)).read_text().strip() == out.strip() != ""


def test_worker_killed_mid_stream(rbee_env: dict[str, str]) -> None:
    with running_hive(rbee_env) as hive:
        keeper = Keeper(rbee_env, *LONG)
        pid = worker_pid(keeper.wait_for("spawned worker"))
        keeper.wait_for("[inference]")
        some_text_printed(keeper)
        os.kill(pid, signal.SIGKILL)
        code, out, err = keeper.finish()
        assert code == ExitCode.FAILURE, err
        assert "WORKER_CRASHED" in err and "exited with code -9" in err
        assert_partial_saved(out, err)
        again = run_rbee("infer", *SHORT, env=rbee_env)
        assert again.returncode == 0 and "[worker] spawned worker" in again.stderr, "hive healthy"
        assert hive.poll() is None


def test_hung_worker_is_detected_by_missed_heartbeats(rbee_env: dict[str, str]) -> None:
    with running_hive(rbee_env):
        keeper = Keeper(rbee_env, *LONG)
        pid = worker_pid(keeper.wait_for("spawned worker"))
        keeper.wait_for("[inference]")
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        code, _, err = keeper.finish()
        elapsed = time.monotonic() - started
        assert code == ExitCode.FAILURE and "WORKER_CRASHED" in err, err
        assert elapsed < 12, f"a hung worker took {elapsed:.1f} s to detect"
        assert_gone([pid])


def test_ctrl_c_cancels_and_the_worker_serves_the_next_job(rbee_env: dict[str, str]) -> None:
    with running_hive(rbee_env):
        keeper = Keeper(rbee_env, *LONG)
        pid = worker_pid(keeper.wait_for("spawned worker"))
        keeper.wait_for("[inference]")
        time.sleep(0.5)
        keeper.proc.send_signal(signal.SIGINT)
        code, _, err = keeper.finish()
        assert code == ExitCode.CANCELED and "Canceled." in err, err
        deadline = time.monotonic() + 5
        while "idle" not in (ps := run_rbee("ps", env=rbee_env)).stdout:
            assert time.monotonic() < deadline, ps.stdout
        again = run_rbee("infer", *SHORT, env=rbee_env)
        assert again.returncode == 0 and "reusing worker" in again.stderr
        assert str(pid) in run_rbee("ps", env=rbee_env).stdout


def test_a_queued_job_runs_after_the_first(rbee_env: dict[str, str]) -> None:
    with running_hive(rbee_env, "--max-workers", "1", "--parallel", "1"):
        first = Keeper(rbee_env, "--raw", "-t", "0", "--ignore-eos", "-n", "150", "Hello")
        first.wait_for("[inference]")
        second = Keeper(rbee_env, *SHORT)
        second.wait_for("[queue] waiting for a free slot: position 1 of 1")
        code1, _, err1 = first.finish()
        code2, _, err2 = second.finish()
        assert code1 == 0 and code2 == 0, err1 + err2
        assert "150 tokens" in err1 and "12 tokens" in err2
        workers = {m.group(1) for m in re.finditer(r"job \S+ on worker (\S+)", err1 + err2)}
        assert len(workers) == 1, "both jobs ran on the one worker"


def test_keep_alive_zero_and_expiry(rbee_env: dict[str, str]) -> None:
    port = rbee_env["RBEE_HIVE_PORT"]
    with running_hive(rbee_env, "--keep-alive", "4s"):
        once = run_rbee("infer", "--keep-alive", "0", *SHORT, env=rbee_env)
        assert once.returncode == 0, once.stderr
        pid = int(PIDS.findall(once.stderr)[0])
        assert_gone([pid])
        kept = run_rbee("infer", *SHORT, env=rbee_env)
        pid = int(PIDS.findall(kept.stderr)[0])
        assert str(pid) in run_rbee("ps", "--node", f"127.0.0.1:{port}", env=rbee_env).stdout
        time.sleep(5)
        assert_gone([pid])
        assert run_rbee("ps", env=rbee_env).stdout == "no workers\n"


def test_sigterm_drains_then_stops(rbee_env: dict[str, str]) -> None:
    with running_hive(rbee_env) as hive:
        keeper = Keeper(rbee_env, "--raw", "-t", "0", "--ignore-eos", "-n", "200", "Hello")
        pid = worker_pid(keeper.wait_for("spawned worker"))
        keeper.wait_for("[inference]")
        hive.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = run_rbee(
            "infer", "--node", f"127.0.0.1:{rbee_env['RBEE_HIVE_PORT']}", *SHORT, env=rbee_env
        )
        assert refused.returncode == ExitCode.BUSY and "HIVE_DRAINING" in refused.stderr
        code, _, err = keeper.finish()
        assert code == 0 and "200 tokens" in err, "the running job finished within the grace"
        _, log = hive.communicate(timeout=30)
        assert hive.returncode == 0
        assert '"workers": "1/1 stopped cleanly"' in log, log[-2000:]
        assert_gone([pid])


@pytest.mark.parametrize("how", ["sigterm-twice", "workers-stop"])
def test_a_job_the_hive_stops_is_no_ctrl_c(rbee_env: dict[str, str], how: str) -> None:
    """The hive shutting down (a second SIGTERM skips the grace) or `rbee workers stop` ends a
    running job with JOB_STOPPED and its own exit status, and the partial text is saved."""
    with running_hive(rbee_env) as hive:
        keeper = Keeper(rbee_env, *LONG)
        worker = re.findall(r"w-[0-9a-f]+", keeper.wait_for("spawned worker"))[0]
        keeper.wait_for("[inference]")
        some_text_printed(keeper)
        if how == "workers-stop":
            stopped = run_rbee("workers", "stop", worker, env=rbee_env)
            assert stopped.returncode == 0, stopped.stderr
            expected = f"stopped by a keeper stopping worker {worker}"
        else:
            hive.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            hive.send_signal(signal.SIGTERM)
            expected = "stopped by the hive shutting down"
        code, out, err = keeper.finish()
        assert code == ExitCode.STOPPED and "JOB_STOPPED" in err and expected in err, err
        assert "Canceled." not in err
        assert_partial_saved(out, err)


def test_hive_killed_leaves_no_worker_and_the_keeper_says_hive_lost(
    rbee_env: dict[str, str],
) -> None:
    with running_hive(rbee_env) as hive:
        keeper = Keeper(rbee_env, *LONG)
        pid = worker_pid(keeper.wait_for("spawned worker"))
        keeper.wait_for("[inference]")
        started = time.monotonic()
        some_text_printed(keeper)
        hive.kill()
        code, out, err = keeper.finish()
        assert code == ExitCode.NETWORK and "HIVE_LOST" in err, err
        assert_partial_saved(out, err)
        assert time.monotonic() - started < 8
        deadline = time.monotonic() + 5
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the worker outlived its hive by 5 s"
            time.sleep(0.1)


@pytest.mark.timeout(600)
def test_fifty_concurrent_keepers_on_two_workers(rbee_env: dict[str, str]) -> None:
    """Each request completes with all its tokens or gets a clear busy error; the hive's
    memory afterwards is within 10% of before."""
    flags = ("--max-workers", "2", "--max-workers-per-model", "2", "--max-queue", "8")
    with running_hive(rbee_env, *flags) as hive:
        warm = [Keeper(rbee_env, *SHORT) for _ in range(4)]  # both workers loaded, heap warm
        assert all(k.finish()[0] == 0 for k in warm)
        before = psutil.Process(hive.pid).memory_info().rss
        keepers = [
            Keeper(rbee_env, "--raw", "-t", "0", "--ignore-eos", "-n", "16", f"Story {i}:")
            for i in range(50)
        ]
        results = [k.finish(timeout=400) for k in keepers]
        after = psutil.Process(hive.pid).memory_info().rss
    done = busy = 0
    for code, _, err in results:
        if code == 0:
            match = SUMMARY.search(err)
            assert match is not None and match.group(1) == "16", err
            done += 1
        else:
            assert code == ExitCode.BUSY and "ALL_SLOTS_BUSY" in err, err
            busy += 1
    print(
        f"50 keepers: {done} completed with all 16 tokens, {busy} told busy; "
        f"hive RSS {before >> 20} MiB before, {after >> 20} MiB after"
    )
    assert done + busy == 50 and done > 0
    assert after <= before * 1.10, f"hive RSS grew from {before} to {after}"


def test_logs_of_a_hive_and_of_one_worker(rbee_env: dict[str, str]) -> None:
    with running_hive(rbee_env):
        ran = run_rbee("--log-level", "debug", "infer", *SHORT, env=rbee_env)
        assert ran.returncode == 0, ran.stderr
        worker = re.search(r"spawned worker (w-\w+)", ran.stderr)
        assert worker is not None
        hive_logs = run_rbee("logs", env=rbee_env)
        assert hive_logs.returncode == 0, hive_logs.stderr
        assert "hive ready" in hive_logs.stdout and "worker ready" in hive_logs.stdout
        # One job's events carry its id and its worker's, so a request can be followed through.
        finished = re.search(r"(w-\w+) job finished job=(\S+) tokens=\d+", hive_logs.stdout)
        assert finished is not None and finished.group(1) == worker.group(1), hive_logs.stdout
        job = finished.group(2)
        assert f"job queued job={job} model=" in hive_logs.stdout
        assert f"{worker.group(1)} job started job={job}" in hive_logs.stdout
        only = run_rbee("logs", worker.group(1), env=rbee_env)
        assert only.returncode == 0 and "loading model" in only.stdout
        lines = only.stdout.splitlines()
        assert lines and all(worker.group(1) in line for line in lines), only.stdout
        assert "hive ready" not in only.stdout
