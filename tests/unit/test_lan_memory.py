"""What the keeper remembers of the LAN decides whether it starts an ephemeral hive early."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee.keeper.connect import LAN_MEMORY, lan_had_hives, remember_lan
from rbee.keeper.survey import HiveView
from rbee.protocol.messages import PROTOCOL_VERSION, HelloReply


def answered(source: str) -> HiveView:
    hello = HelloReply(
        node="n",
        rbee_version="0",
        protocol_version=PROTOCOL_VERSION,
        pid=1,
        stream_port=2,
        status="ok",
    )
    return HiveView("10.0.0.1", 7830, source, hello=hello)


def test_a_keeper_that_never_looked_assumes_one_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RBEE_DATA_DIR", str(tmp_path))
    assert not lan_had_hives()
    remember_lan([answered("mdns"), HiveView("10.0.0.2", 7830, "seed")])
    assert lan_had_hives()
    remember_lan([answered("local")])  # this machine's own hive is no LAN
    assert not lan_had_hives()
    (tmp_path / LAN_MEMORY).write_text("{not json")
    assert not lan_had_hives()
