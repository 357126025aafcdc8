"""Receipts: `rbee infer --receipt` and the gateway's X-Rbee-Receipt header and field say what
served an answer: the node that ran it, its worker, the model file's sha256 as the catalog has
it, the llama.cpp build, the sampling settings and the timings."""

from __future__ import annotations

import json
from typing import Any

import httpx

from rbee.protocol.messages import DEFAULT_MODEL
from tests.helpers import run_rbee
from tests.integration.test_gateway import HiveFactory, serving, sse_events, start_hive

__all__ = ["start_hive"]
NODE = "receipt-node"


def catalog_sha256(env: dict[str, str]) -> str:
    listed = run_rbee("models", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (entry,) = [e for e in json.loads(listed.stdout) if e["name"] == DEFAULT_MODEL]
    assert entry["sha256"] and len(entry["sha256"]) == 64
    return str(entry["sha256"])


def check(receipt: dict[str, Any], sha256: str) -> None:
    assert receipt["node"] == NODE and receipt["worker"].startswith("w-")
    assert receipt["model"] == DEFAULT_MODEL and receipt["model_sha256"] == sha256
    assert receipt["where"] == "cpu" and "llama-cpp-python" in receipt["engine"]
    assert receipt["queue_s"] >= 0


def test_infer_prints_a_receipt(start_hive: HiveFactory, rbee_env: dict[str, str]) -> None:
    start_hive("--node-name", NODE)
    done = run_rbee("infer", "--receipt", "-t", "0", "-n", "8", "Hello", env=rbee_env)
    assert done.returncode == 0, done.stderr
    said = dict(
        line.removeprefix("[receipt] ").split(": ", 1)
        for line in done.stderr.splitlines()
        if line.startswith("[receipt] ")
    )
    check(
        {**said, "queue_s": float(said["queue_s"]), "sampling": json.loads(said["sampling"])},
        catalog_sha256(rbee_env),
    )
    assert json.loads(said["sampling"])["temperature"] == 0.0 and said["tokens"] == "8"
    assert float(said["tokens_per_s"]) > 0 and float(said["ttft_s"]) > 0


def test_the_gateway_returns_the_receipt(start_hive: HiveFactory, rbee_env: dict[str, str]) -> None:
    start_hive("--node-name", NODE)
    sha256 = catalog_sha256(rbee_env)
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0.3,
        "seed": 4,
    }
    with serving() as server:
        whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        streamed = httpx.post(
            server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
        )
    assert whole.status_code == 200, whole.text
    header = json.loads(whole.headers["x-rbee-receipt"])
    field = whole.json()["rbee"]["receipt"]
    check(field, sha256)
    assert header == field and field["worker"] == whole.json()["rbee"]["worker_id"]
    assert field["sampling"]["temperature"] == 0.3 and field["sampling"]["seed"] == 4
    assert field["tokens"] == whole.json()["usage"]["completion_tokens"]
    check(json.loads(streamed.headers["x-rbee-receipt"]), sha256)  # the worker was warm
    events = [json.loads(e[6:]) for e in sse_events(streamed.content) if e != b"data: [DONE]"]
    last = next(e for e in events if e.get("rbee"))
    check(last["rbee"]["receipt"], sha256)
    assert last["choices"][0]["finish_reason"] and last["rbee"]["receipt"]["tokens"] > 0
