"""Interface selection and node ids (no multicast here: that is tested on namespaces)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee import discovery
from rbee.errors import InvalidRequest
from rbee.protocol.messages import PROTOCOL_VERSION


def test_interfaces_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_MDNS_INTERFACES", "127.0.0.1")
    assert discovery.interfaces() == ["127.0.0.1"]
    monkeypatch.setenv("RBEE_MDNS_INTERFACES", "lo, 127.0.0.1")
    assert discovery.interfaces() == ["127.0.0.1", "127.0.0.1"]
    monkeypatch.setenv("RBEE_MDNS_INTERFACES", "no-such-if0")
    with pytest.raises(InvalidRequest, match="no-such-if0"):
        discovery.interfaces()


def test_default_interfaces_skip_loopback_and_virtual(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEE_MDNS_INTERFACES", raising=False)
    assert "127.0.0.1" not in discovery.interfaces()


def test_node_id_is_stable(tmp_path: Path) -> None:
    first = discovery.node_id(tmp_path)
    assert len(first) == 32 and discovery.node_id(tmp_path) == first
    (tmp_path / "node_id").write_text("")
    assert discovery.node_id(tmp_path) != first


def test_txt_record_round_trip_fields() -> None:
    a = discovery.Announcement(
        node="n" * 300,
        node_id="x",
        address="10.0.0.1",
        port=1,
        stream_port=2,
        rbee_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
    )
    txt = a.txt()
    assert len(txt["node"]) == discovery.MAX_TXT_VALUE and txt["proto"] == str(PROTOCOL_VERSION)
    assert txt["cl"] == "default" and a.endpoint == "10.0.0.1:1"


def test_cluster_and_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEE_CLUSTER", "  lab ")
    monkeypatch.setenv("RBEE_SEEDS", "a:1, b ,,")
    assert discovery.cluster() == "lab" and discovery.seeds() == ["a:1", "b"]
