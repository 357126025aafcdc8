"""A hive SIGKILLed on a LAN of namespaces costs the next `rbee infer` no more than a short wait,
however the keeper still hears of it: a seed host (RBEE_SEEDS) or an mDNS record that something
still serves for it (as a sleep proxy does for a machine that went quiet).

Three hosts: hives alpha and beta, the keeper on the third. alpha holds the idle worker; after
its SIGKILL the next request loads a worker on beta, and the ones after that reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rbee import discovery
from tests.integration.test_lan import env_for, hive_on, nodes, pair, rbee_on, wait_listed
from tests.lan import Host, Lan, available, leftover_namespaces

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "LAN available")

SUBNET = 10
BUDGET_MS = 3000  # issue 16: first token within 3 s plus the worker's load time
WARM_MS = 1000  # a warm request: the survey and one token; below the old 1 s wait on the dead
WARM_RUNS = 3

BROWSE = """
import dataclasses, json
from rbee import discovery
print(json.dumps([dataclasses.asdict(a) for a in discovery.browse(timeout_s=2.0)]))
"""

STAND_IN = """
import json, sys
from rbee import discovery
record = discovery.Announcement(**json.loads(sys.argv[1]))
announcer = discovery.Announcer(record, [record.address])
print("STAND-IN-READY", flush=True)
sys.stdin.read()  # until the test is done
announcer.close()
"""


def announcement(host: Host, env: dict[str, str], node: str) -> discovery.Announcement:
    """What ``node`` announces, as a keeper on ``host`` hears it."""
    ran = subprocess.run(
        host.argv([sys.executable, "-c", BROWSE]), env=env, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    heard = [discovery.Announcement(**a) for a in json.loads(ran.stdout)]
    found = [a for a in heard if a.node == node]
    assert found, heard
    return found[0]


@contextmanager
def still_heard(
    how: str,
    record: discovery.Announcement,
    host: Host,
    env: dict[str, str],
    keeper: dict[str, str],
) -> Iterator[dict[str, str]]:
    """The keeper's environment while it still hears of the dead hive ``how``: named in
    RBEE_SEEDS, or its own mDNS record served from its ``host`` by a stand-in process."""
    if how == "seed":
        yield {**keeper, "RBEE_SEEDS": record.address}
        return
    argv = host.argv([sys.executable, "-c", STAND_IN, json.dumps(dataclasses.asdict(record))])
    stand_in = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert stand_in.stdout is not None
        while (line := stand_in.stdout.readline()) and line != "STAND-IN-READY\n":
            pass  # its log lines
        assert line, "the stand-in did not start"
        yield keeper
    finally:
        stand_in.communicate(input="", timeout=30)


def first_token_ms(stderr: str) -> tuple[int, int]:
    """``first token after N ms`` and the worker's load time in ms (0: a warm worker)."""
    done = re.search(r"first token after (\d+) ms", stderr)
    assert done is not None, stderr
    ready = re.search(r"\[ready\] worker \S+ loaded \S+ in ([\d.]+) s", stderr)
    return int(done.group(1)), round(float(ready.group(1)) * 1000) if ready else 0


@pytest.mark.parametrize("how", ["seed", "mdns"])
def test_a_sigkilled_hive_costs_the_next_request_no_wait(
    rbee_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    with Lan.create(3, subnet=SUBNET + (how == "mdns")) as lan:
        h1, h2, h3 = lan.hosts
        env1, env2 = env_for(h1, rbee_env, tmp_path, "alpha"), env_for(h2, rbee_env, tmp_path, "b")
        keeper = env_for(h3, rbee_env, tmp_path, "keeper")
        with hive_on(h1, env1, "alpha") as alpha, hive_on(h2, env2, "beta"):
            wait_listed(h3, keeper, {"alpha", "beta"})
            for host, env, name in ((h1, env1, "alpha"), (h2, env2, "beta")):
                assert pair(host, env, h3, keeper, name=name).returncode == 0
            record = announcement(h3, keeper, "alpha")
            warm = rbee_on(h3, keeper, "infer", "--node", "alpha", "-t", "0", "-n", "4", "Hi")
            assert warm.returncode == 0, warm.stderr
            again = rbee_on(h3, keeper, "infer", "-t", "0", "-n", "4", "Hi")
            assert "chose alpha" in again.stderr, again.stderr  # and lan.json knows the LAN
            alpha.send_signal(signal.SIGKILL)
            alpha.wait(10)
            with still_heard(how, record, h1, env1, keeper) as env:
                listed = {str(n["address"]): n for n in nodes(h3, env)}
                first = rbee_on(h3, env, "infer", "-t", "0", "-n", "8", "Hello")
                assert first.returncode == 0 and "[hive] chose beta" in first.stderr, first.stderr
                ttft, load = first_token_ms(first.stderr)
                assert load > 0, first.stderr
                warm_ttft = []
                for _ in range(WARM_RUNS):
                    ran = rbee_on(h3, env, "infer", "-t", "0", "-n", "8", "Hello")
                    assert "a worker there with a free slot already holds" in ran.stderr, ran.stderr
                    warm_ttft.append(first_token_ms(ran.stderr)[0])
    assert leftover_namespaces(lan.tag) == [], "namespaces must be removed"
    assert ttft < BUDGET_MS + load, first.stderr
    assert statistics.median(warm_ttft) < WARM_MS, f"first tokens after {warm_ttft} ms"
    dead = f"{h1.address}:7830"
    assert listed[dead]["state"] == "unreachable (nothing listens on its port)", listed
    skipped = "alpha" if how == "mdns" else dead
    assert f"[hive] skipping {skipped}: nothing listens on its port" in first.stderr
