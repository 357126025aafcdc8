"""Log probabilities through `rbee serve` with the official `openai` client: chat's
``logprobs``/``top_logprobs`` whole and streamed, completions' ``logprobs``, checked against
llama-cpp-python's own figures for the same prompt."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee.hive import probe
from rbee.protocol.messages import DEFAULT_MODEL
from rbee.worker.engine import in_process
from tests.integration.test_gateway import STORY, Server, client_for, gateway, start_hive

__all__ = ["gateway", "start_hive"]


def test_chat_logprobs_whole_and_streamed(gateway: Server) -> None:
    messages: Any = [{"role": "user", "content": "Name a colour."}]
    asked: Any = {"max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    with client_for(gateway) as client:
        whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, **asked)
        chunks = list(
            client.chat.completions.create(
                model=DEFAULT_MODEL, messages=messages, stream=True, **asked
            )
        )
        plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=2)
    content = whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert content and len(content) == whole.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(map(math.exp, tops)) <= 1 + 1e-6
        assert entry.token == entry.top_logprobs[0].token  # greedy: the likeliest token
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-5)
        assert bytes(entry.bytes or []).decode(errors="replace") == entry.token
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(
        math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
        for a, b in zip(streamed, content, strict=True)
    )
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_equal_llama_cpps(gateway: Server, model_path: Path) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "prompt": STORY,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 2,
    }
    reply = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    ours = reply.json()["choices"][0]["logprobs"]
    llama = in_process(str(model_path), probe.for_model(str(model_path)), logits_all=True)
    theirs = llama.create_completion(
        STORY, max_tokens=8, temperature=0.0, repeat_penalty=1.0, logprobs=2
    )["choices"][0]["logprobs"]
    del llama
    assert ours["tokens"] == theirs["tokens"]
    for a, b in zip(ours["token_logprobs"], theirs["token_logprobs"], strict=True):
        assert math.isclose(a, b, abs_tol=0.02), (a, b)
    assert [sorted(t) for t in ours["top_logprobs"]] == [sorted(t) for t in theirs["top_logprobs"]]
    assert ours["text_offset"][0] == 0 and ours["text_offset"] == sorted(ours["text_offset"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_bad_logprobs_fields_are_400s(
    gateway: Server, fields: dict[str, object], param: str
) -> None:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    reply = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
