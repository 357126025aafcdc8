"""`rbee ps` renders what the hives said (the survey is replaced: no sockets)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

import pytest

from rbee.keeper import nodes
from rbee.protocol.messages import WorkerInfo


def info(worker_id: str, state: str, slots: int, busy: int) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        model="smollm2",
        backend="cpu",
        device="cpu",
        pid=4242,
        state=state,
        last_activity=1.0,
        slots=slots,
        slots_busy=busy,
    )


def test_ps_shows_busy_and_total_slots_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = [info("w-batch", "busy", 4, 3), info("w-idle", "idle", 2, 0)]
    view = SimpleNamespace(name="beta", status=SimpleNamespace(workers=workers))

    def survey(*_: Any, **__: Any) -> list[Any]:
        return [view]

    monkeypatch.setattr(nodes, "survey", survey)
    out = io.StringIO()
    nodes.list_workers(None, out=out)
    header, *rows = out.getvalue().splitlines()
    assert header.split()[:5] == ["NODE", "WORKER", "MODEL", "STATE", "SLOTS"]
    assert rows[0].split()[:5] == ["beta", "w-batch", "smollm2", "busy", "3/4"]
    assert rows[1].split()[:5] == ["beta", "w-idle", "smollm2", "idle", "0/2"]


def test_ps_json_is_one_record_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = [info("w-batch", "busy", 4, 3), info("w-idle", "idle", 2, 0)]
    view = SimpleNamespace(name="beta", status=SimpleNamespace(workers=workers))
    monkeypatch.setattr(nodes, "survey", lambda *_a, **_k: [view])
    out = io.StringIO()
    nodes.list_workers(None, as_json=True, out=out)
    busy, idle = json.loads(out.getvalue())
    assert (busy["node"], busy["worker_id"], busy["slots"], busy["slots_busy"]) == (
        "beta",
        "w-batch",
        4,
        3,
    )
    assert busy["where"] == "cpu" and busy["idle_s"] is None
    assert idle["state"] == "idle" and idle["idle_s"] > 0
