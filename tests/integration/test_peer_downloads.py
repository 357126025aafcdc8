"""Download once, use on every machine: three namespace hosts with real hives, CURVE, mDNS and
the local Hub server on a fourth host.

alpha downloads model X from the Hub; beta, paired with alpha and gamma as a hive, pulls X
from them and not from the Hub; alpha dies mid-transfer and beta finishes from gamma; gamma's
copy rots on disk (its mtime kept, as bit rot keeps it) and beta bans gamma at the first bad
chunk, finishing from alpha; the Hub goes away and beta still gets X by its hf: reference.
Stopped mid-transfer, beta resumes its part file from its peers when it starts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.hub_server import FakeHub, FakeRepo
from tests.integration.test_lan import env_for, hive_on, pair, rbee_on, wait_listed
from tests.lan import Host, Lan, available, inside, leftover_namespaces

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "LAN available")

REPO, FILE = "peer/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = f"hf:{REPO}/{FILE}"
RATE = "12M"  # what alpha and gamma send per second: a transfer lasts long enough to cut


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan.create(4, subnet=11) as lan:
        yield lan
    assert leftover_namespaces(lan.tag) == [], "namespaces must be removed"


def pulled(host: Host, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return rbee_on(host, env, "models", "pull", REFERENCE, *flags, timeout=180)


def held_file(env: dict[str, str]) -> Path | None:
    """The verified copy of X in a hive's data directory, if there is one."""
    found = list(Path(env["RBEE_DATA_DIR"], "models", "hf").glob(f"*/*/{FILE}"))
    return found[0] if found else None


def part_bytes(env: dict[str, str]) -> int:
    parts = list(Path(env["RBEE_DATA_DIR"], "models", "hf").glob(f"*/*/{FILE}.part"))
    return parts[0].stat().st_size if parts else 0


def forget(host: Host, env: dict[str, str]) -> None:
    """`rbee models rm` on that machine: the file goes, the next pull starts from nothing."""
    listed = rbee_on(host, env, "models", "list", "--json")
    held = str(held_file(env))
    names = [m["name"] for m in json.loads(listed.stdout) if m["path"] == held]
    assert names, listed.stdout
    assert rbee_on(host, env, "models", "rm", names[0]).returncode == 0
    assert held_file(env) is None


def pulling(keeper_host: Host, keeper: dict[str, str]) -> subprocess.Popen[str]:
    """beta's pull of X, started and left running."""
    argv = [sys.executable, "-m", "rbee", "models", "pull", REFERENCE, "--node", "beta"]
    return subprocess.Popen(keeper_host.argv(argv), env=keeper, stderr=subprocess.PIPE, text=True)


def under_way(env: dict[str, str]) -> None:
    """Wait until 8 MiB of X are in that hive's part file."""
    deadline = time.monotonic() + 60
    while part_bytes(env) < 8 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert part_bytes(env) >= 8 << 20, "the transfer never got going"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_lines(host: Host, env: dict[str, str], node: str) -> str:
    return rbee_on(host, env, "logs", node).stdout


def test_hives_fetch_models_from_each_other_first(
    lan: Lan, rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    h1, h2, h3, h4 = lan.hosts
    data = model_path.read_bytes()  # the default model (98 MB: 24 chunks)
    size = len(data)
    with inside(h4):  # the Hub's server listens on the fourth host
        hub = FakeHub(
            {REPO: FakeRepo(files={FILE: data})}, host=h4.address, redirect_host=h4.address
        )
    base = {**rbee_env, "HF_ENDPOINT": hub.endpoint}
    alpha, beta = env_for(h1, base, tmp_path, "alpha"), env_for(h2, base, tmp_path, "beta")
    gamma, keeper = env_for(h3, base, tmp_path, "gamma"), env_for(h4, base, tmp_path, "keeper")
    expected = hashlib.sha256(data).hexdigest()
    with ExitStack() as stack:
        stack.enter_context(hub)  # stopped early below: stopping it twice is harmless
        alpha_hive = stack.enter_context(hive_on(h1, alpha, "alpha", "--share-rate", RATE))
        beta_hive = stack.enter_context(hive_on(h2, beta, "beta"))
        stack.enter_context(hive_on(h3, gamma, "gamma", "--share-rate", RATE))
        wait_listed(h4, keeper, {"alpha", "beta", "gamma"})
        for host, env, name in ((h1, alpha, "alpha"), (h2, beta, "beta"), (h3, gamma, "gamma")):
            assert pair(host, env, h4, keeper, role="admin", name=name).returncode == 0
        # beta trusts alpha and gamma as hives, and they give beta's key the hive role.
        for host, env, name in ((h1, alpha, "alpha"), (h3, gamma, "gamma")):
            assert pair(host, env, h2, beta, role="hive", name=name).returncode == 0

        # alpha pulls X from the Hub.
        first = pulled(h4, keeper, "--node", "alpha")
        assert first.returncode == 0, first.stderr
        assert hub.bytes_served(REPO, FILE) == size

        # beta pulls X: not one byte of it from the Hub, all from alpha, sha256 verified.
        hub.clear()
        second = pulled(h4, keeper, "--node", "beta")
        assert second.returncode == 0, second.stderr
        assert hub.bytes_served(REPO, FILE) == 0
        assert "from hive alpha" in second.stderr, second.stderr
        copy = held_file(beta)
        assert copy is not None and sha256_of(copy) == expected

        # gamma gets X from the Hub too (--no-peers); beta forgets it and pulls again; alpha
        # dies mid-transfer and beta finishes from gamma.
        assert pulled(h4, keeper, "--node", "gamma", "--no-peers").returncode == 0
        forget(h2, beta)
        hub.clear()
        third = pulling(h4, keeper)
        under_way(beta)
        alpha_hive.kill()
        _, err = third.communicate(timeout=120)
        assert third.returncode == 0, err + log_lines(h4, keeper, "beta")[-6000:]
        assert hub.bytes_served(REPO, FILE) == 0
        logs = log_lines(h4, keeper, "beta")
        assert re.search(r"peer dropped from a download peer=alpha", logs), logs[-3000:]
        assert re.search(r"still_giving=\{'gamma': \d+\}", logs), logs[-3000:]
        copy = held_file(beta)
        assert copy is not None and sha256_of(copy) == expected

        # beta stops mid-transfer (from gamma alone now); started again, it resumes its part.
        forget(h2, beta)
        cut = pulling(h4, keeper)
        under_way(beta)
        beta_hive.terminate()
        assert beta_hive.wait(30) == 0
        kept = part_bytes(beta)
        assert cut.wait(60) != 0 and kept >= 8 << 20  # the keeper was told; the part stays
        stack.enter_context(hive_on(h2, beta, "beta"))
        wait_listed(h4, keeper, {"beta"})
        resumed = pulled(h4, keeper, "--node", "beta")
        assert resumed.returncode == 0, resumed.stderr
        logs = log_lines(h4, keeper, "beta")
        offsets = [int(x) for x in re.findall(r"resuming download .*?offset=(\d+)", logs)]
        assert offsets and offsets[-1] == kept, (kept, logs[-3000:])
        assert hub.bytes_served(REPO, FILE) == 0
        copy = held_file(beta)
        assert copy is not None and sha256_of(copy) == expected

        # alpha comes back; gamma's copy rots (one byte per chunk, mtime kept, so gamma cannot
        # tell); beta is given a bad chunk by gamma, bans it and completes from alpha.
        stack.enter_context(hive_on(h1, alpha, "alpha", "--share-rate", RATE))
        wait_listed(h4, keeper, {"alpha"})
        rotten = held_file(gamma)
        assert rotten is not None
        stat = rotten.stat()
        with rotten.open("r+b") as f:
            for offset in range(100_000, size, 4 << 20):
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(rotten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        forget(h2, beta)
        hub.clear()
        fourth = pulled(h4, keeper, "--node", "beta")
        assert fourth.returncode == 0, fourth.stderr
        assert hub.bytes_served(REPO, FILE) == 0
        copy = held_file(beta)
        assert copy is not None and sha256_of(copy) == expected
        logs = log_lines(h4, keeper, "beta")
        assert "peer banned" in logs and "did not match its hash" in logs, logs[-3000:]

        # The Hub goes away: beta still gets X by its reference, the revision from alpha.
        hub.__exit__(None, None, None)
        forget(h2, beta)
        fifth = pulled(h4, keeper, "--node", "beta")
        assert fifth.returncode == 0, fifth.stderr
        copy = held_file(beta)
        assert copy is not None and sha256_of(copy) == expected
        # And with --no-hub, a model no peer holds is refused with a reason.
        missing = rbee_on(
            h4, keeper, "models", "pull", f"hf:{REPO}/other.gguf", "--node", "beta", "--no-hub"
        )
        assert missing.returncode != 0 and "MODEL_NOT_FOUND" in missing.stderr, missing.stderr
