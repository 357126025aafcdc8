"""The keeper's warm path against a real hive (in this process's thread, real sockets, real
synthetic workers): a request to an idle worker skips EnsureWorker, and a worker that vanished
between the status and the request is replaced without an error."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from rbee.errors import BackendUnavailable
from rbee.hive.request import Request
from rbee.keeper import infer
from rbee.keeper.connect import connect
from rbee.protocol.messages import EnsureWorker, GenerateParams, ListWorkers, StopWorker, WorkerList
from tests.helpers import hive_in_thread

MODEL = "synthetic:0"
REQUEST = infer.InferRequest(MODEL, GenerateParams(prompt="x", max_tokens=8, temperature=0.0))


@pytest.fixture
def ensures(
    rbee_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[EnsureWorker]]:
    """A hive this machine's keeper finds at its port; the EnsureWorker requests it gets."""
    with hive_in_thread(tmp_path / "hive") as hive:
        monkeypatch.setenv("RBEE_HIVE_PORT", hive.front_endpoint.rsplit(":", 1)[1])
        handle = hive.handlers[EnsureWorker]
        seen: list[EnsureWorker] = []

        def counted(request: Request, frame: Any) -> None:
            seen.append(frame)
            handle(request, frame)

        hive.handlers[EnsureWorker] = counted
        yield seen


def run(request: infer.InferRequest = REQUEST) -> tuple[infer.InferResult, str]:
    err = io.StringIO()
    result = infer.run(request, out=io.StringIO(), err=err)
    return result, err.getvalue()


def test_a_warm_request_goes_straight_to_the_idle_worker(ensures: list[EnsureWorker]) -> None:
    cold, said = run()
    assert cold.tokens == 8 and "[ready] worker" in said, said
    assert len(ensures) == 1
    warm, said = run()
    assert warm.tokens == 8 and warm.worker_id == cold.worker_id
    assert f"[worker] reusing worker {cold.worker_id}" in said, said
    assert len(ensures) == 1, "the status already showed the idle worker"
    with pytest.raises(BackendUnavailable):  # an idle CPU worker is no answer to a CUDA request
        run(infer.InferRequest(MODEL, REQUEST.params, backend="cuda"))
    assert [e.backend for e in ensures] == ["auto", "cuda"]


def test_a_worker_gone_since_the_status_is_replaced(
    ensures: list[EnsureWorker], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = run()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        link = connect(ctx, None, MODEL)
        assert link.status is not None and [w.worker_id for w in link.status.workers] == [
            first.worker_id
        ]
        link.client.request(StopWorker(worker_id=first.worker_id), 5.0)
        deadline = time.monotonic() + 10
        while True:
            listed = link.client.request(ListWorkers(), 5.0)
            assert isinstance(listed, WorkerList)
            if not listed.workers:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.05)
        monkeypatch.setattr(infer, "connect", lambda *_, **__: link)  # the stale status, on purpose
        result, said = run()
    finally:
        ctx.destroy(linger=0)
    assert f"reusing worker {first.worker_id}" in said, said
    assert result.tokens == 8 and result.worker_id != first.worker_id, said
    assert "[ready] worker" in said
