"""`rbee top` against a real `rbee hive`: plain snapshots off a terminal, and the live view in a
real terminal (tmux: start it, read the screen, send keys)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from rbee.catalog import DEFAULT_MODEL
from rbee.keeper.link import hello
from tests.conftest import REPO
from tests.helpers import rbee_cmd, run_rbee

NODE = "topnode"
SCREEN_TIMEOUT_S = 30.0  # the first screen: a keeper's imports and one survey, on a busy machine
QUIT_TIMEOUT_S = 15.0  # q: the sampler's survey under way ends within its deadlines


@pytest.fixture
def hive(rbee_env: dict[str, str], tmp_path: Path) -> Iterator[int]:
    """This test's `rbee hive` on its isolated port, stopped (SIGTERM) after the test."""
    with (tmp_path / "hive.log").open("wb") as log:
        proc = subprocess.Popen(
            rbee_cmd("hive", "--node-name", NODE), env=rbee_env, stderr=log, cwd=REPO
        )
    try:
        port = int(rbee_env["RBEE_HIVE_PORT"])
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            client, _ = hello(ctx, "127.0.0.1", port, (2.0, 2.0, 4.0, 8.0))
            client.close()
        finally:
            ctx.term()
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.model
def test_once_prints_a_plain_snapshot_with_the_node_and_its_worker(
    hive: int, rbee_env: dict[str, str]
) -> None:
    done = run_rbee("infer", "-n", "4", "hi", env=rbee_env)
    assert done.returncode == 0, done.stderr
    too_long = run_rbee("infer", "--raw", "-n", "4", "-", env=rbee_env, stdin="word " * 6000)
    assert too_long.returncode != 0 and "INVALID_REQUEST" in too_long.stderr
    result = run_rbee("top", "--once", env=rbee_env, timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b" not in out, "escape codes off a terminal"
    lines = out.splitlines()
    assert lines[0].startswith("rbee top · 1 hive, 1 worker")
    node_row = next(line.split() for line in lines if line.startswith(NODE + " "))
    assert node_row[1] == f"127.0.0.1:{hive}" and node_row[2] == "ok"
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["NODE", "WORKER"])
    worker = lines[header + 1].split()
    assert worker[0] == NODE and worker[1].startswith("w-") and worker[2] == DEFAULT_MODEL
    assert worker[3] == "idle" and worker[4] == "0/" + worker[4].split("/")[1]
    errors = out[out.index("last errors:") :]  # the failed job, as the hive reports it
    assert f"{NODE}" in errors and f"INVALID_REQUEST ({DEFAULT_MODEL})" in errors


def test_plain_snapshots_repeat_until_interrupted(hive: int, rbee_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        rbee_cmd("top", "--interval", "0.5"), env=rbee_env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        summaries = 0
        deadline = time.monotonic() + SCREEN_TIMEOUT_S
        while summaries < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            summaries += line.startswith("rbee top · 1 hive")
        assert summaries == 2
        proc.send_signal(signal.SIGINT)  # Ctrl-C ends it as q does: quietly, status 0
        rest, _ = proc.communicate(timeout=QUIT_TIMEOUT_S)
        assert proc.returncode == 0
        assert "\x1b" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


class Tmux:
    """A tmux server of this test's own (its own socket and configuration)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.socket = str(tmp_path / "tmux.sock")
        self.conf = tmp_path / "tmux.conf"
        self.conf.write_text("set -g remain-on-exit on\n")  # a dead pane stays, to be read
        self.env = env

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", self.socket, "-f", str(self.conf), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.returncode == 0, f"tmux {args[0]}: {done.stderr}"
        return done.stdout

    def screen(self, target: str) -> str:
        """What the pane shows now."""
        return self("capture-pane", "-p", "-t", target)

    def wait(self, target: str, holds: Callable[[str], bool], timeout_s: float) -> str:
        """The screen once ``holds`` says so; fails with the last screen at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.screen(target)
            if holds(text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"the screen never showed what was expected:\n{text}")
            time.sleep(0.2)

    def kill(self) -> None:
        """Stop the server and what its panes run (SIGHUP)."""
        subprocess.run(
            ["tmux", "-S", self.socket, "kill-server"],
            env=self.env,
            capture_output=True,
            timeout=10,
        )


def test_live_view_in_a_real_terminal_sorts_and_quits(
    hive: int, rbee_env: dict[str, str], tmp_path: Path
) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): no terminal to test in")
    rbee_vars = [f"{k}={v}" for k, v in rbee_env.items() if k.startswith("RBEE_")]
    top = shlex.join(["env", *rbee_vars, *rbee_cmd("top", "--interval", "1")])
    status = tmp_path / "status"  # its exit status (the pane's own says only the shell's)
    command = f"{top}; echo $? > {shlex.quote(str(status))}"
    tmux = Tmux(tmp_path, {**os.environ, **rbee_env})
    try:
        tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", "-c", REPO, command)
        first = tmux.wait("top", lambda s: "rbee top · 1 hive" in s and NODE in s, SCREEN_TIMEOUT_S)
        assert "sort: node" in first and "NODE▼" in first
        assert "q quit" in first and "LAST ERRORS" in first
        tmux("send-keys", "-t", "top", "s")
        sorted_by_model = tmux.wait("top", lambda s: "sort: model" in s, 10.0)
        assert "NODE▼" not in sorted_by_model and NODE in sorted_by_model
        tmux("send-keys", "-t", "top", "q")
        dead = "#{pane_dead}"
        deadline = time.monotonic() + QUIT_TIMEOUT_S
        while tmux("display-message", "-p", "-t", "top", dead).strip() != "1":
            assert time.monotonic() < deadline, f"q did not quit:\n{tmux.screen('top')}"
            time.sleep(0.2)
        after = tmux.screen("top")
        assert status.read_text().strip() == "0"
        assert "sort:" not in after, "the view's screen was left behind"
    finally:
        tmux.kill()
