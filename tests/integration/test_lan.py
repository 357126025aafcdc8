"""rbee across a LAN of network namespaces: three hosts on a bridge, multicast on, real hives,
real workers, real model. Keepers run on the third host and find the others by mDNS alone."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from rbee.errors import ExitCode
from rbee.protocol.messages import PROTOCOL_VERSION
from tests.lan import Host, Lan, available, leftover_namespaces

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "LAN available")

READY_TIMEOUT_S = 30.0


def env_for(host: Host, base: dict[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    """One machine's environment: its own data directory, mDNS on its own address."""
    env = {**base, "RBEE_DATA_DIR": str(tmp_path / name), "RBEE_MDNS_INTERFACES": host.address}
    for key in ("RBEE_HIVE_PORT", "RBEE_STREAM_PORT"):
        env.pop(key, None)  # each namespace has its own ports: use the defaults
    return env


def rbee_on(
    host: Host, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        host.argv([sys.executable, "-m", "rbee", *args]),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def hive_on(
    host: Host, env: dict[str, str], name: str, *flags: str
) -> Iterator[subprocess.Popen[str]]:
    argv = host.argv(
        [sys.executable, "-m", "rbee", "hive", "--host", "0.0.0.0", "--node-name", name, *flags]
    )
    # Its log goes to a file: a pipe nobody reads fills up (64 KiB) and blocks the hive's loop.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, env=env, stderr=log, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)


def nodes(host: Host, env: dict[str, str], *flags: str) -> list[dict[str, object]]:
    result = rbee_on(host, env, "nodes", "--json", *flags)
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


def wait_listed(host: Host, env: dict[str, str], names: set[str]) -> list[dict[str, object]]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        listed = nodes(host, env)
        if {str(n["name"]) for n in listed} >= names or time.monotonic() > deadline:
            return listed
        time.sleep(0.2)


def pair(
    hive: Host,
    hive_env: dict[str, str],
    keeper: Host,
    keeper_env: dict[str, str],
    code_used: str | None = None,
    role: str = "infer",
    name: str = "alpha",
) -> subprocess.CompletedProcess[str]:
    """`rbee hive pair` on the hive, `rbee pair NAME CODE` on the keeper (the real flow)."""
    rbee = [sys.executable, "-m", "rbee"]
    argv = hive.argv(
        [*rbee, "hive", "pair", "--node-name", name, "--role", role, "--timeout", "20s"]
    )
    server = subprocess.Popen(argv, env=hive_env, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    first = server.stdout.readline()
    code = re.search(r"\d{4}-\d{4}", first)
    assert code is not None, first
    result = rbee_on(keeper, keeper_env, "pair", name, code_used or code.group(0))
    if code_used is not None:
        server.send_signal(signal.SIGTERM)
    server.wait(20)
    return result


def spares_running(data_dir: str, grace_s: float = 5.0) -> list[int]:
    """Ephemeral hives of the keeper using ``data_dir`` still running after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                ephemeral = "--ephemeral" in (proc.info["cmdline"] or [])
                if ephemeral and proc.environ().get("RBEE_DATA_DIR") == data_dir:
                    alive.append(proc.pid)
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan.create(3) as lan:
        yield lan
    assert leftover_namespaces(lan.tag) == [], "namespaces must be removed"


def test_hives_are_found_and_serve_across_the_lan(
    lan: Lan, rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    h1, h2, h3 = lan.hosts
    env1, env2 = env_for(h1, rbee_env, tmp_path, "alpha"), env_for(h2, rbee_env, tmp_path, "beta")
    keeper = env_for(h3, rbee_env, tmp_path, "keeper")
    imported = rbee_on(h2, env2, "models", "import", str(model_path), "--name", "only-on-beta")
    assert imported.returncode == 0, imported.stderr
    with hive_on(h1, env1, "alpha"), hive_on(h2, env2, "beta"):
        wait_listed(h3, keeper, {"alpha", "beta"})
        for host, env, name in ((h1, env1, "alpha"), (h2, env2, "beta")):
            assert pair(host, env, h3, keeper, name=name).returncode == 0
        listed = nodes(h3, keeper)
        by_name = {n["name"]: n for n in listed}
        assert set(by_name) == {"alpha", "beta"}, listed
        assert by_name["alpha"]["address"] == f"{h1.address}:7830"
        assert by_name["beta"]["address"] == f"{h2.address}:7830"
        assert by_name["alpha"]["models"] == ["smollm2-135m-instruct"]
        assert sorted(by_name["beta"]["models"]) == ["only-on-beta", "smollm2-135m-instruct"]
        for n in listed:
            assert n["state"] == "ok" and n["protocol_version"] == PROTOCOL_VERSION
            assert n["workers"] == []
            assert n["source"] == "mdns" and n["rbee_version"]
        table = rbee_on(h3, keeper, "nodes")
        assert "alpha" in table.stdout and f"{h2.address}:7830" in table.stdout

        # The choice follows the model: only beta's catalog has it.
        ran = rbee_on(
            h3, keeper, "infer", "-m", "only-on-beta", "-t", "0", "-n", "32", "Why is the sky blue?"
        )
        assert ran.returncode == 0, ran.stderr
        assert f"[hive] chose beta ({h2.address}:7830): its catalog has only-on-beta" in ran.stderr
        assert "[done] 32 tokens" in ran.stderr and len(ran.stdout.split()) >= 15
        # A keeper that never looked assumes a one-machine setup: it started an ephemeral hive
        # at once (here, in vain) and now knows better for the next request.
        spare_log = Path(keeper["RBEE_DATA_DIR"]) / "ephemeral-hive.log"
        assert "not preloaded" in spare_log.read_text(), "the model is only on beta"
        assert spares_running(keeper["RBEE_DATA_DIR"]) == []
        memory = json.loads((Path(keeper["RBEE_DATA_DIR"]) / "lan.json").read_text())
        assert memory["hives"] == 2
        spare_log.unlink()
        again = rbee_on(
            h3, keeper, "infer", "-m", "only-on-beta", "-t", "0", "-n", "32", "Why is the sky blue?"
        )
        said = again.stderr
        assert "a worker there with a free slot already holds only-on-beta" in said, said
        # README's promise: the same request on the same engine state gives the same text. A
        # warm worker reuses the cached prompt (it computes only the last prompt token), so its
        # answers equal each other; a fresh worker's may differ in the last bits of the logits.
        third = rbee_on(
            h3, keeper, "infer", "-m", "only-on-beta", "-t", "0", "-n", "32", "Why is the sky blue?"
        )
        assert third.returncode == 0 and len(third.stdout.split()) >= 15, third.stderr
        assert third.stdout == again.stdout

        # The default model is on both; an idle worker on neither: more free RAM wins (either).
        anywhere = rbee_on(h3, keeper, "infer", "-t", "0", "-n", "8", "Hello")
        assert anywhere.returncode == 0 and "[hive] chose " in anywhere.stderr, anywhere.stderr
        assert not spare_log.exists(), "the LAN had hives last time: no ephemeral hive"
        ps = rbee_on(h3, keeper, "ps")
        assert "beta" in ps.stdout and "only-on-beta" in ps.stdout


def test_a_sigkilled_hive_is_not_chosen(lan: Lan, rbee_env: dict[str, str], tmp_path: Path) -> None:
    h1, h2, h3 = lan.hosts
    env1, env2 = env_for(h1, rbee_env, tmp_path, "alpha"), env_for(h2, rbee_env, tmp_path, "beta")
    keeper = env_for(h3, rbee_env, tmp_path, "keeper")
    with hive_on(h1, env1, "alpha") as alpha, hive_on(h2, env2, "beta"):
        wait_listed(h3, keeper, {"alpha", "beta"})
        for host, env, name in ((h1, env1, "alpha"), (h2, env2, "beta")):
            assert pair(host, env, h3, keeper, name=name).returncode == 0
        warm = rbee_on(h3, keeper, "infer", "--node", "alpha", "-t", "0", "-n", "4", "Hi")
        assert warm.returncode == 0 and f"{h1.address}" in warm.stderr, warm.stderr
        alpha.send_signal(signal.SIGKILL)
        alpha.wait(10)
        ran = rbee_on(h3, keeper, "infer", "-t", "0", "-n", "8", "Hello")
        assert ran.returncode == 0, ran.stderr
        assert "[hive] chose beta" in ran.stderr
        listed = nodes(h3, keeper)
        assert [n["name"] for n in listed] == ["beta"]
        gone = rbee_on(h3, keeper, "infer", "--node", f"{h1.address}:7830", "-n", "4", "Hi")
        assert gone.returncode == ExitCode.NETWORK and "HIVE_UNREACHABLE" in gone.stderr


def test_a_hive_started_after_the_keeper_is_found(
    lan: Lan, rbee_env: dict[str, str], tmp_path: Path
) -> None:
    h1, _, h3 = lan.hosts
    keeper = env_for(h3, rbee_env, tmp_path, "keeper")
    argv = h3.argv([sys.executable, "-m", "rbee", "nodes", "--json", "--timeout", "15"])
    browsing = subprocess.Popen(argv, env=keeper, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    with hive_on(h1, env_for(h1, rbee_env, tmp_path, "alpha"), "late"):
        out, _ = browsing.communicate(timeout=30)
    listed = json.loads(out)
    assert [n["name"] for n in listed] == ["late"] and "not paired" in listed[0]["state"]


def test_a_cloned_node_id_is_reported(lan: Lan, rbee_env: dict[str, str], tmp_path: Path) -> None:
    """Two machines with one node id (a copied disk) and one name are both listed and flagged."""
    h1, h2, h3 = lan.hosts
    env1, env2 = env_for(h1, rbee_env, tmp_path, "one"), env_for(h2, rbee_env, tmp_path, "two")
    for env in (env1, env2):
        Path(env["RBEE_DATA_DIR"]).mkdir(parents=True)
        (Path(env["RBEE_DATA_DIR"]) / "node_id").write_text("c" * 32 + "\n")
    keeper = env_for(h3, rbee_env, tmp_path, "keeper")
    with hive_on(h1, env1, "twin"), hive_on(h2, env2, "twin"):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(listed := nodes(h3, keeper)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sorted(str(n["address"]) for n in listed) == [f"{h1.address}:7830", f"{h2.address}:7830"]
    assert all("CLONED NODE ID" in str(n["state"]) for n in listed), listed


def test_versions_and_unknown_nodes(lan: Lan, rbee_env: dict[str, str], tmp_path: Path) -> None:
    h1, _, h3 = lan.hosts
    keeper = env_for(h3, rbee_env, tmp_path, "keeper")
    env1 = env_for(h1, rbee_env, tmp_path, "alpha")
    with hive_on(h1, env1, "alpha"):
        wait_listed(h3, keeper, {"alpha"})
        assert pair(h1, env1, h3, keeper).returncode == 0
        by_name = rbee_on(h3, keeper, "infer", "--node", "alpha", "-t", "0", "-n", "4", "Hi")
        assert by_name.returncode == 0 and h1.address in by_name.stderr, by_name.stderr
        # Without multicast (another pool here), a seed host is asked directly.
        seeded = {**keeper, "RBEE_CLUSTER": "elsewhere", "RBEE_SEEDS": h1.address}
        listed = nodes(h3, seeded)
        assert [(n["name"], n["source"]) for n in listed] == [("alpha", "seed")]
    empty = rbee_on(h3, keeper, "nodes")
    assert "no hives found" in empty.stdout
