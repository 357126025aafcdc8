"""One model across two hives: three network-namespace hosts, real hives, CURVE, the real model.

alpha may plan with 200 MiB of RAM (``--memory-limit``), too little for the default model with
its context; beta lends. alpha paired with beta as a hive (`rbee hive pair --role hive` on beta,
`rbee pair beta CODE` with alpha's data directory), so alpha finds beta by mDNS and borrows its
memory for the layers it cannot hold; the keeper on the third host only asks alpha.

A lender that hangs while running is made with the cgroup v2 freezer: its tasks stop being
scheduled but are not in state T, so beta's check for a stopped lender does not see it; alpha's
stall watch (``--lender-stall``) must.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rbee.errors import ExitCode
from tests.integration.test_lan import env_for, hive_on, nodes, pair, rbee_on, wait_listed
from tests.lan import Host, Lan, available, leftover_namespaces

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "LAN available")

PROMPT = "The capital of France is"
LIMIT = "200M"  # the default model needs ~283 MiB with one slot of 4096 tokens
FOUND_S = 30.0
LONG = ["-t", "0", "-n", "2000", "--ignore-eos", "--raw", PROMPT]
STALL_S = 2  # alpha's --lender-stall
EXIT_S = 5.0  # a lender that dies or stops: a coded error within this


def cgroup2_root() -> Path | None:
    """Where a cgroup v2 hierarchy with the freezer is mounted and writable (None: nowhere)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, *_ = line.split()
        root = Path(where)
        if kind == "cgroup2" and os.access(root, os.W_OK):
            return root
    return None


@contextlib.contextmanager
def frozen(pid: int, root: Path) -> Iterator[None]:
    """``pid`` frozen by the cgroup v2 freezer (alive, state S not T, no progress) in a cgroup
    of its own, removed afterwards (the process is moved back if it still lives)."""
    group = root / f"rbee-test-freeze-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "cgroup.freeze").write_text("1")
        deadline = time.monotonic() + 5
        while "frozen 1" not in (group / "cgroup.events").read_text():
            assert time.monotonic() < deadline, "the cgroup did not freeze"
            time.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(OSError):
            (group / "cgroup.freeze").write_text("0")
            for left in (group / "cgroup.procs").read_text().split():
                (root / "cgroup.procs").write_text(left)
        deadline = time.monotonic() + 5
        while group.exists():
            try:
                group.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def rbee_processes(data_dir: str, word: str) -> list[psutil.Process]:
    """Processes of one machine (its data directory) whose command line has ``word``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = proc.info["cmdline"] or []
            if word in cmdline and proc.environ().get("RBEE_DATA_DIR") == data_dir:
                found.append(proc)
    return found


def open_ports(host: Host, target: str) -> list[int]:
    """Every TCP port of ``target`` that accepts a connection from ``host``."""
    scan = (
        "import socket, sys\n"
        "found = []\n"
        "for port in range(1, 65536):\n"
        "    s = socket.socket(); s.settimeout(0.2)\n"
        f"    if s.connect_ex(({target!r}, port)) == 0: found.append(port)\n"
        "    s.close()\n"
        "print(' '.join(map(str, found)))\n"
    )
    done = subprocess.run(
        host.argv([sys.executable, "-c", scan]), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return [int(p) for p in done.stdout.split()]


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan.create(3, subnet=3) as lan:
        yield lan
    assert leftover_namespaces(lan.tag) == [], "namespaces must be removed"


def test_a_model_too_big_for_one_hive_runs_with_another_hives_memory(
    lan: Lan, rbee_env: dict[str, str], tmp_path: Path
) -> None:
    h1, h2, h3 = lan.hosts
    alpha, beta = env_for(h1, rbee_env, tmp_path, "alpha"), env_for(h2, rbee_env, tmp_path, "beta")
    keeper = env_for(h3, rbee_env, tmp_path, "keeper")
    stranger = env_for(h3, rbee_env, tmp_path, "stranger")
    with (
        hive_on(h1, alpha, "alpha", "--memory-limit", LIMIT, "--lender-stall", str(STALL_S)),
        hive_on(h2, beta, "beta") as beta_hive,
    ):
        wait_listed(h3, keeper, {"alpha", "beta"})
        for host, env, name in ((h1, alpha, "alpha"), (h2, beta, "beta")):
            assert pair(host, env, h3, keeper, name=name).returncode == 0
        args = ["-t", "0", "-n", "32", "--raw", PROMPT]
        alone = rbee_on(h3, keeper, "infer", "--node", "beta", *args)
        assert alone.returncode == 0 and len(alone.stdout.split()) >= 10, alone.stderr

        # Alone, alpha cannot hold the model: it says so, naming what it needs and has.
        refused = rbee_on(h3, keeper, "infer", "--node", "alpha", *args)
        assert refused.returncode == ExitCode.RESOURCES, refused.stderr
        assert "INSUFFICIENT_RAM" in refused.stderr and "fits nowhere" in refused.stderr

        # alpha pairs with beta as a hive; it finds beta and plans with its memory.
        assert pair(h2, beta, h1, alpha, role="hive", name="beta").returncode == 0
        deadline = time.monotonic() + FOUND_S
        while True:
            explained = rbee_on(h3, keeper, "explain", "smollm2-135m-instruct", "--node", "alpha")
            if "cpu+beta" in explained.stdout or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "cpu+beta" in explained.stdout, explained.stdout + explained.stderr

        split = rbee_on(h3, keeper, "infer", "--node", "alpha", *args)
        assert split.returncode == 0, split.stderr
        assert split.stdout == alone.stdout  # the same greedy text, half of it computed on beta
        ps = rbee_on(h3, keeper, "ps")
        assert "cpu+beta" in ps.stdout, ps.stdout
        listed = {str(n["name"]): n for n in nodes(h3, keeper)}
        assert listed["beta"]["state"] == "ok"

        # Nothing but the hives' own ports is reachable: the lender listens on beta's loopback.
        assert len(rbee_processes(beta["RBEE_DATA_DIR"], "lender")) == 1
        for host in (h1, h2):
            assert open_ports(h3, host.address) == [7830, 7831], host.address

        # A keeper without a key gets nothing; a key without the hive role gets no loan.
        nothing = rbee_on(h3, stranger, "infer", "--node", "alpha", *args)
        assert nothing.returncode == ExitCode.ACCESS and not nothing.stdout, nothing.stderr
        refuse = (
            "from rbee.keeper.connect import open_named\n"
            "from rbee.protocol.messages import PipeOpen\n"
            "from rbee.errors import RbeeError\n"
            "import zmq\n"
            "ctx = zmq.Context()\n"
            "link = open_named(ctx, 'beta')\n"
            "try:\n"
            "    link.client.request(PipeOpen(pipe_id='p-1.1', lease='p-1'), 10)\n"
            "except RbeeError as exc:\n"
            "    print(exc.code, exc.message)\n"
        )
        out = subprocess.run(
            h3.argv([sys.executable, "-c", refuse]), env=keeper, capture_output=True, text=True
        )
        assert out.stdout.startswith("LENDING_REFUSED"), out.stdout + out.stderr

        # The lender dies mid-stream; then (a new worker, a new lender each time) the lender
        # is stopped; then it hangs (frozen, not stopped); then the lending hive dies: each
        # time a coded error within 5 s (STALL_S + 4 s for the hang), the partial text kept,
        # no process left behind.
        root = cgroup2_root()
        assert root is not None, "no writable cgroup v2 hierarchy to freeze a lender with"
        for victim in ("lender", "stall", "freeze", "hive"):
            infer = subprocess.Popen(
                h3.argv([sys.executable, "-m", "rbee", "infer", "--node", "alpha", *LONG]),
                env=keeper,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert infer.stdout is not None
            infer.stdout.read(40)  # it streams
            (lender,) = rbee_processes(beta["RBEE_DATA_DIR"], "lender")
            with contextlib.ExitStack() as freezing:
                if victim == "lender":
                    lender.send_signal(signal.SIGKILL)
                elif victim == "stall":
                    lender.send_signal(signal.SIGSTOP)
                elif victim == "freeze":
                    freezing.enter_context(frozen(lender.pid, root))
                    assert lender.status() != psutil.STATUS_STOPPED  # not the SIGSTOP path
                else:
                    beta_hive.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                _, said = infer.communicate(timeout=30)
                took = time.monotonic() - killed
            limit = STALL_S + 4 if victim == "freeze" else EXIT_S
            assert took < limit, (victim, took, said)
            assert infer.returncode == ExitCode.NETWORK and "LENDER_LOST" in said, said
            assert "partial text is saved" in said, said
            if victim == "freeze":
                assert "stopped making progress" in said, said
                print(f"frozen lender: LENDER_LOST after {took:.2f} s (stall {STALL_S} s)")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (
                rbee_processes(alpha["RBEE_DATA_DIR"], "worker")
                or rbee_processes(beta["RBEE_DATA_DIR"], "lender")
            ):
                time.sleep(0.1)
            assert rbee_processes(alpha["RBEE_DATA_DIR"], "worker") == []
            assert rbee_processes(beta["RBEE_DATA_DIR"], "lender") == []
    for env in (alpha, beta):
        assert rbee_processes(env["RBEE_DATA_DIR"], "hive") == []
