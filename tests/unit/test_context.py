"""Unit tests for a request's context length (Ollama's ``options.num_ctx``, `rbee infer --ctx`):
which workers serve it, what context a new worker gets, and how the gateway reads it."""

from __future__ import annotations

import pytest

from rbee.gateway.errors import BadParameter
from rbee.gateway.ollama import num_ctx
from rbee.hive.provision import slot_context
from rbee.hive.registry import (
    JobRecord,
    Limits,
    WorkerRecord,
    holds_context,
    pick_free,
    plan_worker,
)
from rbee.hive.request import Request
from rbee.protocol.codec import decode, encode
from rbee.protocol.messages import (
    DEFAULT_CTX_TOKENS,
    MAX_CTX_TOKENS,
    GenerateParams,
    StartJob,
    WorkerList,
)

A = "/models/a.gguf"


def worker(wid: str, n_ctx: int, state: str = "idle", last_activity: float = 100.0) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid,
        model="a",
        model_path=A,
        pid=1000,
        state=state,  # type: ignore[arg-type]
        last_activity=last_activity,
        n_ctx=n_ctx,
        job_ids=["j-busy"] if state == "busy" else [],
    )


def job(n_ctx: int, backend: str = "", device: str = "") -> JobRecord:
    return JobRecord(
        job_id="j-1",
        model="a",
        model_path=A,
        request=Request(who=b"keeper", rid=1, role="infer"),
        params=GenerateParams(prompt="hi"),
        keep_alive_s=300.0,
        backend=backend,
        device=device,
        n_ctx=n_ctx,
    )


# --------------------------------------------------------------------------- the predicate


@pytest.mark.parametrize(
    ("has", "asked", "serves"),
    [
        (4096, 4096, True),  # exactly as asked
        (4096, 2048, True),  # more than asked: the prompt fits all the same
        (2048, 4096, False),  # less: the request would fail or be cut short there
        (2048, 0, True),  # nothing asked (the hive resolves 0 before it asks)
        (0, 4096, True),  # a worker of unknown context (an older hive's) is not second-guessed
        (256, 257, False),
    ],
)
def test_holds_context(has: int, asked: int, serves: bool) -> None:
    assert holds_context(worker("w", has), asked) is serves


def test_a_job_runs_only_where_its_context_fits() -> None:
    assert job(4096).runs_on(worker("big", 4096))
    assert not job(4096).runs_on(worker("small", 2048))
    assert job(0).runs_on(worker("small", 2048))


def test_a_job_needs_both_its_device_and_its_context() -> None:
    gpu = worker("gpu", 8192)
    gpu.backend, gpu.device = "cuda", "0"
    assert job(4096, "cuda", "0").runs_on(gpu)
    assert not job(4096, "cpu", "cpu").runs_on(gpu)  # the context fits, the device does not
    assert not job(16384, "cuda", "0").runs_on(gpu)


def test_pick_free_skips_a_worker_with_too_little_context() -> None:
    small, big = worker("small", 2048, last_activity=200.0), worker("big", 4096)
    assert pick_free([small, big], A, serves=lambda w: holds_context(w, 4096)) is big
    assert pick_free([small], A, serves=lambda w: holds_context(w, 4096)) is None


# --------------------------------------------------------------------------- the plan


def test_a_larger_context_spawns_a_new_worker_beside_a_smaller_one() -> None:
    small = worker("small", 2048)
    plan = plan_worker([small], A, Limits(max_workers=4), True, lambda w: holds_context(w, 4096))
    assert (plan.action, plan.evict) == ("spawn", None)


def test_a_larger_context_at_the_worker_limit_replaces_an_idle_smaller_worker() -> None:
    small = worker("small", 2048)
    plan = plan_worker([small], A, Limits(max_workers=1), True, lambda w: holds_context(w, 4096))
    assert (plan.action, plan.evict) == ("spawn", small)


def test_a_larger_context_that_does_not_fit_is_refused_not_queued_on_a_smaller_worker() -> None:
    small = worker("small", 2048, state="busy")
    plan = plan_worker([small], A, Limits(max_workers=1), True, lambda w: holds_context(w, 4096))
    assert plan.action == "busy"  # the existing limits answer: ALL_SLOTS_BUSY, retried
    plan = plan_worker([small], A, Limits(), False, lambda w: holds_context(w, 4096))
    assert plan.action == "busy"


def test_a_smaller_context_reuses_a_larger_worker() -> None:
    big = worker("big", 4096)
    plan = plan_worker([big], A, Limits(), True, lambda w: holds_context(w, 2048))
    assert (plan.action, plan.worker) == ("reuse", big)


# --------------------------------------------------------------------------- the context


@pytest.mark.parametrize(
    ("trained", "asked", "gets"),
    [
        (8192, 0, DEFAULT_CTX_TOKENS),  # nothing asked: the default
        (2048, 0, 2048),  # … at most the model's own
        (0, 0, DEFAULT_CTX_TOKENS),  # a model that does not say
        (8192, 256, 256),
        (8192, 8192, 8192),
        (8192, 65536, 8192),  # more than trained: cut to it, as Ollama does
        (0, 65536, 65536),
    ],
)
def test_slot_context(trained: int, asked: int, gets: int) -> None:
    assert slot_context(trained, asked) == gets


# --------------------------------------------------------------------------- the wire


def test_start_job_and_worker_info_carry_the_context() -> None:
    start = StartJob(job_id="j-1", model="a", params=GenerateParams(prompt="hi"), n_ctx=4096)
    assert decode(encode(start)).frame == start
    assert StartJob(job_id="j-1", model="a", params=GenerateParams(prompt="hi")).n_ctx == 0
    listed = WorkerList(workers=[worker("w", 2048).info()])
    back = decode(encode(listed)).frame
    assert isinstance(back, WorkerList)
    assert back.workers[0].n_ctx == 2048


# --------------------------------------------------------------------------- the gateway


@pytest.mark.parametrize(
    ("body", "n_ctx"),
    [
        ({}, 0),
        ({"options": {}}, 0),
        ({"options": {"num_ctx": 4096}}, 4096),
        ({"options": {"num_ctx": 2048.0}}, 2048),
        ({"options": {"num_ctx": MAX_CTX_TOKENS}}, MAX_CTX_TOKENS),
    ],
)
def test_num_ctx_is_read_from_options(body: dict[str, object], n_ctx: int) -> None:
    assert num_ctx(body) == n_ctx


@pytest.mark.parametrize("value", ["4096", True, 0, -1, 1.5, MAX_CTX_TOKENS + 1, [4096]])
def test_a_bad_num_ctx_is_a_400_naming_it(value: object) -> None:
    with pytest.raises(BadParameter) as raised:
        num_ctx({"options": {"num_ctx": value}})
    assert raised.value.param == "options.num_ctx"
    assert "options.num_ctx" in raised.value.message
