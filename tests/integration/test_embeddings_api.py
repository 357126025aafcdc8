"""Embeddings through `rbee serve`, driven by the official `openai` and `ollama` clients, with
the real model behind a real hive."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import ollama
import pytest

from rbee.protocol.messages import DEFAULT_MODEL
from tests.integration.test_gateway import Server, client_for, gateway, start_hive
from tests.integration.test_ollama_api import client_for as ollama_client_for

__all__ = ["gateway", "start_hive"]
WIDTH = 576  # SmolLM2-135M's embedding length
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell."]


def test_openai_embeddings(gateway: Server) -> None:
    with client_for(gateway) as client:
        reply = client.embeddings.create(model=DEFAULT_MODEL, input=[*TEXTS, TEXTS[0]])
        floats = client.embeddings.create(
            model=DEFAULT_MODEL, input=TEXTS[0], encoding_format="float"
        )
        short = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[0], dimensions=64)
    assert reply.model == DEFAULT_MODEL and [d.index for d in reply.data] == [0, 1, 2, 3]
    cat, kitten, market, cat_again = (np.array(d.embedding) for d in reply.data)
    assert cat.shape == (WIDTH,) and np.allclose(np.linalg.norm(cat), 1.0, atol=1e-5)
    assert np.array_equal(cat, cat_again)  # the same text twice, the same vector
    assert cat @ kitten > cat @ market
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 4 * 5
    assert np.allclose(np.array(floats.data[0].embedding), cat, atol=1e-6)  # float or base64
    cut = np.array(short.data[0].embedding)
    assert cut.shape == (64,) and np.allclose(np.linalg.norm(cut), 1.0, atol=1e-5)
    assert np.allclose(cut, cat[:64] / np.linalg.norm(cat[:64]), atol=1e-5)


def test_raw_base64_is_little_endian_float32(gateway: Server) -> None:
    body = {"model": DEFAULT_MODEL, "input": TEXTS[1], "encoding_format": "base64"}
    reply = httpx.post(gateway.url + "/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    vector = np.frombuffer(base64.b64decode(reply.json()["data"][0]["embedding"]), "<f4")
    assert vector.shape == (WIDTH,) and np.allclose(np.linalg.norm(vector), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": ""}, "input"),
        ({"input": 5}, "input"),
        ({"input": ["x"] * 300}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": 100_000}, "dimensions"),
        ({"input": "x", "model": ""}, "model"),
    ],
)
def test_openai_bad_input_is_a_400_naming_the_field(
    gateway: Server, body: dict[str, Any], param: str
) -> None:
    reply = httpx.post(
        gateway.url + "/v1/embeddings", json={"model": DEFAULT_MODEL, **body}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"], error


def test_ollama_embed_and_embeddings(gateway: Server) -> None:
    client = ollama_client_for(gateway)
    embedded = client.embed(DEFAULT_MODEL, input=TEXTS)
    vectors = [np.array(v) for v in embedded.embeddings]
    assert len(vectors) == 3 and all(v.shape == (WIDTH,) for v in vectors)
    assert all(np.allclose(np.linalg.norm(v), 1.0, atol=1e-5) for v in vectors)
    assert (embedded.prompt_eval_count or 0) > 10
    one = client.embed(DEFAULT_MODEL, input=TEXTS[0], truncate=True)
    assert np.allclose(one.embeddings[0], vectors[0], atol=1e-6)
    legacy = np.array(client.embeddings(DEFAULT_MODEL, prompt=TEXTS[0]).embedding)
    assert legacy.shape == (WIDTH,) and np.linalg.norm(legacy) > 2  # raw, not normalized
    assert np.allclose(legacy / np.linalg.norm(legacy), vectors[0], atol=1e-5)
    assert client.embed(DEFAULT_MODEL, input=[]).embeddings == []
    with pytest.raises(ollama.ResponseError) as unknown:
        client.embed("no-such-model", input="hi")
    assert unknown.value.status_code == 404 and "no-such-model" in unknown.value.error
    bad = httpx.post(
        gateway.url + "/api/embed", json={"model": DEFAULT_MODEL, "input": {"a": 1}}, timeout=30
    )
    assert bad.status_code == 400 and "input" in bad.json()["error"]
