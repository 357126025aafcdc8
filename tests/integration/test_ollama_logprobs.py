"""Ollama's ``logprobs``/``top_logprobs`` on /api/chat and /api/generate through `rbee serve`,
with the official `ollama` client (0.6.3 exposes them) and the real model: whole and streamed,
each token's figure the one the OpenAI route gives for the same greedy prompt."""

from __future__ import annotations

import math
from typing import Any

import httpx
import ollama
import pytest

from rbee.protocol.messages import DEFAULT_MODEL
from tests.integration.test_gateway import STORY, Server, gateway, start_hive

__all__ = ["gateway", "start_hive"]
QUESTION = [{"role": "user", "content": "Name a colour."}]
GREEDY = {"temperature": 0, "num_predict": 10}
TOP = 3


def client_for(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def check_entries(entries: list[Any], top: int) -> None:
    """Each token's log probability is ≤ 0 and, greedy, its likeliest alternative's; the
    alternatives come most likely first. (The client's Logprob type has no ``bytes``: the
    raw test reads them.)"""
    assert entries
    for e in entries:
        assert e.logprob <= 0
        tops = [t.logprob for t in e.top_logprobs or []]
        assert len(tops) == top
        assert tops == sorted(tops, reverse=True)
        assert sum(map(math.exp, tops)) <= 1 + 1e-6
        assert e.top_logprobs[0].token == e.token
        assert math.isclose(e.logprob, tops[0], abs_tol=1e-5)


def test_chat_logprobs_whole_and_streamed_equal_the_openai_routes(gateway: Server) -> None:
    client = client_for(gateway)
    whole = client.chat(
        DEFAULT_MODEL, messages=QUESTION, options=GREEDY, logprobs=True, top_logprobs=TOP
    )
    assert whole.logprobs is not None and len(whole.logprobs) == whole.eval_count
    check_entries(whole.logprobs, TOP)
    assert "".join(e.token for e in whole.logprobs) == whole.message.content
    parts = list(
        client.chat(
            DEFAULT_MODEL,
            messages=QUESTION,
            options=GREEDY,
            logprobs=True,
            top_logprobs=TOP,
            stream=True,
        )
    )
    streamed = [e for p in parts for e in p.logprobs or []]
    assert [e.token for e in streamed] == [e.token for e in whole.logprobs]
    for p in parts:  # a line's entries spell its own text
        if p.logprobs:
            assert "".join(e.token for e in p.logprobs) == p.message.content
    openai = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={
            "model": DEFAULT_MODEL,
            "messages": QUESTION,
            "temperature": 0,
            "max_tokens": 10,
            "logprobs": True,
            "top_logprobs": TOP,
        },
        timeout=60,
    ).json()
    theirs = openai["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in theirs] == [e.token for e in whole.logprobs]
    for ours, its in zip(whole.logprobs, theirs, strict=True):
        assert math.isclose(ours.logprob, its["logprob"], abs_tol=1e-4)
    plain = client.chat(DEFAULT_MODEL, messages=QUESTION, options=GREEDY)
    assert plain.logprobs is None  # not asked: no field, as Ollama leaves it out


def test_generate_logprobs_raw_without_alternatives(gateway: Server) -> None:
    answer = httpx.post(
        gateway.url + "/api/generate",
        json={
            "model": DEFAULT_MODEL,
            "prompt": STORY,
            "raw": True,
            "stream": False,
            "logprobs": True,
            "options": {"temperature": 0, "num_predict": 6},
        },
        timeout=60,
    ).json()
    entries = answer["logprobs"]
    assert len(entries) == answer["eval_count"] == 6
    assert all(e["logprob"] <= 0 and "top_logprobs" not in e for e in entries)
    assert all(bytes(e["bytes"]).decode(errors="replace") == e["token"] for e in entries)
    assert "".join(e["token"] for e in entries) == answer["response"]
    completion = httpx.post(
        gateway.url + "/v1/completions",
        json={
            "model": DEFAULT_MODEL,
            "prompt": STORY,
            "temperature": 0,
            "max_tokens": 6,
            "logprobs": 0,
        },
        timeout=60,
    ).json()
    theirs = completion["choices"][0]["logprobs"]["token_logprobs"]
    for ours, its in zip(entries, theirs, strict=True):
        assert math.isclose(ours["logprob"], its, abs_tol=1e-4)
    streamed = client_for(gateway).generate(
        DEFAULT_MODEL,
        STORY,
        raw=True,
        stream=True,
        logprobs=True,
        top_logprobs=2,
        options={"temperature": 0, "num_predict": 6},
    )
    lines = list(streamed)
    check_entries([e for p in lines for e in p.logprobs or []], 2)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_bad_logprobs_fields_are_ollamas_400s(
    gateway: Server, extra: dict[str, Any], field: str
) -> None:
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "stream": False, **extra}
    refused = httpx.post(gateway.url + "/api/chat", json=body, timeout=30)
    assert refused.status_code == 400, refused.text
    assert field in refused.json()["error"]
