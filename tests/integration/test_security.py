"""CURVE, keys and pairing on a LAN of namespaces: a hive on one host listening on its LAN
address (so CURVE is on), keepers on another. Everything through the rbee command."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee.errors import ExitCode
from tests.integration.test_lan import env_for, hive_on, nodes, pair, rbee_on, wait_listed
from tests.lan import Lan, available, leftover_namespaces

pytestmark = pytest.mark.skipif(bool(available()), reason=available() or "LAN available")


@pytest.fixture
def lan() -> Iterator[Lan]:
    with Lan.create(2, subnet=3) as lan:
        yield lan
    assert leftover_namespaces(lan.tag) == []


def test_closed_by_default_then_paired(
    lan: Lan, rbee_env: dict[str, str], tmp_path: Path, model_path: Path
) -> None:
    h1, h2 = lan.hosts
    hive_env, keeper = (
        env_for(h1, rbee_env, tmp_path, "alpha"),
        env_for(h2, rbee_env, tmp_path, "k"),
    )
    stranger = env_for(h2, rbee_env, tmp_path, "stranger")
    with hive_on(h1, hive_env, "alpha"):
        wait_listed(h2, keeper, {"alpha"})
        listed = nodes(h2, keeper)
        assert listed[0]["state"].startswith("unreachable (not paired"), listed
        refused = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert refused.returncode == ExitCode.ACCESS and "not paired" in refused.stderr
        plain = rbee_on(h2, keeper, "infer", "--node", f"{h1.address}:7830", "-n", "4", "Hi")
        assert plain.returncode == ExitCode.ACCESS, plain.stderr
        assert "only talks to keepers it has paired with" in plain.stderr

        wrong = pair(h1, hive_env, h2, keeper, code_used="0000-0000")
        assert wrong.returncode == ExitCode.ACCESS and "wrong pairing code" in wrong.stderr
        authorized = Path(hive_env["RBEE_DATA_DIR"]) / "keys" / "authorized_keys"
        assert not authorized.exists() or authorized.read_text() == ""
        assert "alpha" not in rbee_on(h2, keeper, "keys", "known").stdout

        paired = pair(h1, hive_env, h2, keeper)
        assert paired.returncode == 0 and "paired with alpha" in paired.stderr + paired.stdout
        ran = rbee_on(h2, keeper, "infer", "-t", "0", "-n", "16", "Why is the sky blue?")
        assert ran.returncode == 0 and "[done] 16 tokens" in ran.stderr, ran.stderr
        assert f"chose alpha ({h1.address}:7830)" in ran.stderr

        # An infer key may not pull or stop workers; an unknown key gets nothing at all.
        pull = rbee_on(h2, keeper, "models", "pull", "--node", "alpha", "hf:org/repo")
        assert pull.returncode == ExitCode.ACCESS and "admin role" in pull.stderr
        worker = re.search(r"on worker (w-\w+)", ran.stderr)
        assert worker is not None
        stop = rbee_on(h2, keeper, "workers", "stop", worker.group(1), "--node", "alpha")
        assert stop.returncode == ExitCode.ACCESS, stop.stderr
        rbee_on(h2, stranger, "keys", "show")
        known = Path(keeper["RBEE_DATA_DIR"]) / "keys" / "known_hives"
        (Path(stranger["RBEE_DATA_DIR"]) / "keys" / "known_hives").write_text(known.read_text())
        unknown = rbee_on(h2, stranger, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert (
            unknown.returncode == ExitCode.ACCESS and "refused this keeper's key" in unknown.stderr
        )

        # Hostile model references from the network.
        for ref in ("file:/etc/passwd", f"file:{model_path}", "synthetic:0"):
            bad = rbee_on(h2, keeper, "infer", "--node", "alpha", "-m", ref, "-n", "2", "Hi")
            assert bad.returncode == ExitCode.USAGE and "INVALID_REQUEST" in bad.stderr, ref
        for ref in ("../../etc/passwd", "hf:../../etc", "hf:org/repo/../../x.gguf"):
            bad = rbee_on(h2, keeper, "infer", "--node", "alpha", "-m", ref, "-n", "2", "Hi")
            assert bad.returncode in (ExitCode.USAGE, ExitCode.MODEL), (ref, bad.stderr)

        # Revoked: refused on the next request.
        keeper_key = rbee_on(h2, keeper, "keys", "show").stdout.split()[0]
        revoked = rbee_on(h1, hive_env, "hive", "revoke", keeper_key)
        assert revoked.returncode == 0, revoked.stderr
        after = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert after.returncode == ExitCode.ACCESS, after.stderr


def test_a_changed_hive_key_is_refused(lan: Lan, rbee_env: dict[str, str], tmp_path: Path) -> None:
    h1, h2 = lan.hosts
    hive_env, keeper = (
        env_for(h1, rbee_env, tmp_path, "alpha"),
        env_for(h2, rbee_env, tmp_path, "k"),
    )
    with hive_on(h1, hive_env, "alpha"):
        wait_listed(h2, keeper, {"alpha"})
        assert pair(h1, hive_env, h2, keeper).returncode == 0
    (Path(hive_env["RBEE_DATA_DIR"]) / "keys" / "node.key").unlink()  # reinstalled: a new key
    with hive_on(h1, hive_env, "alpha"):
        wait_listed(h2, keeper, {"alpha"})
        changed = rbee_on(h2, keeper, "infer", "--node", "alpha", "-n", "4", "Hi")
        assert changed.returncode == ExitCode.ACCESS and "HIVE_KEY_CHANGED" in changed.stderr
        assert "rbee keys forget alpha" in changed.stderr
        by_address = rbee_on(h2, keeper, "infer", "--node", f"{h1.address}:7830", "-n", "4", "Hi")
        assert by_address.returncode == ExitCode.ACCESS, by_address.stderr
        assert "HIVE_KEY_CHANGED" in by_address.stderr


def test_a_world_readable_private_key_is_refused(rbee_env: dict[str, str]) -> None:
    from tests.helpers import run_rbee

    shown = run_rbee("keys", "show", env=rbee_env)
    assert shown.returncode == 0 and shown.stdout.split()[1].startswith("SHA256:")
    key_file = Path(rbee_env["RBEE_DATA_DIR"]) / "keys" / "node.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    os.chmod(key_file, 0o644)
    refused = run_rbee("keys", "show", env=rbee_env)
    assert refused.returncode == ExitCode.ACCESS and "readable by others" in refused.stderr
    assert "secret" not in refused.stderr and "chmod 600" in refused.stderr
