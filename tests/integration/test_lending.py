"""One model across two hives: three network-namespace hosts, real hives, CURVE, the real model.

alpha may plan with 200 MiB of RAM (``--memory-limit``), too little for the default model with
its context; beta lends. alpha paired with beta as a hive (`rbee hive pair --role hive` on beta,
`rbee pair beta CODE` with alpha's data directory), so alpha finds beta by mDNS and borrows its
memory for the layers it cannot hold; the keeper on the third host only asks alpha.
"""

from __future__ import annotations

import contextlib
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
        hive_on(h1, alpha, "alpha", "--memory-limit", LIMIT),
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
        # stalls; then the lending hive dies: each time a coded error within 5 s, the partial
        # text kept, no process left behind.
        for victim in ("lender", "stall", "hive"):
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
            if victim == "lender":
                lender.send_signal(signal.SIGKILL)
            elif victim == "stall":
                lender.send_signal(signal.SIGSTOP)
            else:
                beta_hive.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            _, said = infer.communicate(timeout=30)
            assert time.monotonic() - killed < 5, (victim, said)
            assert infer.returncode == ExitCode.NETWORK and "LENDER_LOST" in said, said
            assert "partial text is saved" in said, said
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
