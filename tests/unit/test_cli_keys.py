"""`rbee hive authorize KEY` and `rbee hive revoke KEY` with a key that begins with "-".

z85 has "-" among its characters, so about one public key in 85 starts with it; argparse took
such a key for an unknown option, and the command failed with a usage error (seen in CI: the
security test's `rbee hive revoke` of a freshly made keeper key)."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from rbee.cli import keys_last, main


def public_key(dash: bool) -> str:
    """A real CURVE public key that does (or does not) begin with "-"."""
    for _ in range(100_000):
        public = zmq.curve_keypair()[0].decode()
        if public.startswith("-") == dash:
            return public
    raise AssertionError("no such key in 100,000 tries")  # pragma: no cover


@pytest.mark.parametrize("dash", [True, False])
def test_a_key_is_authorized_and_revoked_whatever_its_first_character(
    dash: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RBEE_DATA_DIR", str(tmp_path))
    key = public_key(dash)
    assert main(["hive", "authorize", key, "--role", "infer", "--comment", "laptop"]) == 0
    listed = (tmp_path / "keys" / "authorized_keys").read_text()
    assert key in listed and "laptop" in listed
    assert main(["hive", "revoke", key]) == 0
    assert "revoked SHA256:" in capsys.readouterr().out
    assert key not in (tmp_path / "keys" / "authorized_keys").read_text()


def test_only_a_key_after_authorize_or_revoke_is_moved() -> None:
    key = public_key(dash=True)
    assert keys_last(["hive", "revoke", key]) == ["hive", "revoke", "--", key]
    assert keys_last(["hive", "authorize", key, "--role", "admin"]) == [
        "hive",
        "authorize",
        "--role",
        "admin",
        "--",
        key,
    ]
    unchanged = [
        ["hive", "revoke", "--", key],  # already behind "--"
        ["hive", "revoke", "-h"],  # an option, not a key
        ["infer", "--node", "alpha", key],  # another command's text
    ]
    for argv in unchanged:
        assert keys_last(argv) == argv
