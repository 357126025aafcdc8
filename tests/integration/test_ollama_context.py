"""Ollama's ``options.num_ctx`` on `rbee serve`, with the real model behind a real hive: a
request gets a worker whose slots hold the context it asks for, a worker with more is reused,
more than the model was trained on is cut to that (as Ollama does), and `rbee infer --ctx`
asks the same way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from rbee.protocol.messages import DEFAULT_MODEL
from tests.helpers import run_rbee
from tests.integration.test_gateway import (
    STORY,
    HiveFactory,
    Server,
    serving,
    start_hive,
    workers,
)

__all__ = ["start_hive"]  # the fixture, shared with the gateway's tests
TRAINED_CTX = 8192  # SmolLM2-135M-Instruct's context_length


@pytest.fixture
def one_slot_gateway(start_hive: HiveFactory) -> Iterator[tuple[Server, int]]:
    """A hive whose workers have one slot each (small, quick loads) and a gateway on it."""
    port = start_hive("--parallel", "1")
    with serving() as server:
        yield server, port


def generate(server: Server, num_ctx: int, prompt: str = STORY) -> httpx.Response:
    body: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "prompt": prompt,
        "raw": True,
        "stream": False,
        "options": {"num_ctx": num_ctx, "num_predict": 4, "temperature": 0},
    }
    return httpx.post(server.url + "/api/generate", json=body, timeout=120)


def contexts(port: int) -> dict[str, int]:
    """Worker id → its context per slot, as the hive lists them."""
    return {w.worker_id: w.n_ctx for w in workers(port) if w.state in ("idle", "busy")}


def test_num_ctx_picks_or_loads_a_worker_with_that_context(
    one_slot_gateway: tuple[Server, int], rbee_env: dict[str, str]
) -> None:
    server, port = one_slot_gateway
    assert generate(server, 2048).status_code == 200
    first = contexts(port)
    assert sorted(first.values()) == [2048], first
    # More than that worker holds: a second worker, loaded with 4096.
    answer = generate(server, 4096)
    assert answer.status_code == 200 and answer.json()["done"], answer.text
    second = contexts(port)
    assert sorted(second.values()) == [2048, 4096], second
    big = next(w for w, n in second.items() if n == 4096)
    # 4096 again reuses it; 2048 again is served by a worker already there (either holds it).
    assert generate(server, 4096).status_code == 200
    assert generate(server, 2048).status_code == 200
    assert contexts(port) == second
    served = {w.worker_id: w.jobs_served for w in workers(port)}
    assert served[big] >= 2
    # Ollama's /api/ps and `rbee ps --json` show both, each with its context.
    ps = httpx.get(server.url + "/api/ps", timeout=30).json()["models"]
    assert sorted(m["context_length"] for m in ps) == [2048, 4096], ps
    assert {m["model"] for m in ps} == {DEFAULT_MODEL}
    listed = run_rbee("ps", "--json", "--node", f"127.0.0.1:{port}", env=rbee_env)
    assert listed.returncode == 0, listed.stderr
    assert sorted(w["n_ctx"] for w in json.loads(listed.stdout)) == [2048, 4096]


def test_num_ctx_over_the_trained_context_is_cut_to_it(
    one_slot_gateway: tuple[Server, int],
) -> None:
    server, port = one_slot_gateway
    answer = generate(server, 4 * TRAINED_CTX)
    assert answer.status_code == 200, answer.text
    assert sorted(contexts(port).values()) == [TRAINED_CTX]
    assert generate(server, TRAINED_CTX).status_code == 200  # the same worker serves it
    assert len(contexts(port)) == 1


def test_a_prompt_longer_than_num_ctx_is_refused_naming_the_context(
    one_slot_gateway: tuple[Server, int],
) -> None:
    server, port = one_slot_gateway
    long_prompt = " ".join([STORY] * 100)  # about 400 tokens
    refused = generate(server, 256, long_prompt)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert "the context holds 256" in error, error
    assert generate(server, 1024, long_prompt).status_code == 200  # a larger one takes it
    assert sorted(contexts(port).values()) == [256, 1024]
    bad = generate(server, -5)
    assert bad.status_code == 400 and "options.num_ctx" in bad.json()["error"]


def test_rbee_infer_ctx(start_hive: HiveFactory, rbee_env: dict[str, str]) -> None:
    port = start_hive("--parallel", "1")
    done = run_rbee("infer", "--raw", "-t", "0", "-n", "4", "--ctx", "1024", STORY, env=rbee_env)
    assert done.returncode == 0, done.stderr
    assert sorted(contexts(port).values()) == [1024]
    bad = run_rbee("infer", "--ctx", "-1", STORY, env=rbee_env)
    assert bad.returncode == 2 and "--ctx" in bad.stderr, bad.stderr
