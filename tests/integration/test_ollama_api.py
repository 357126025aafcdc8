"""Ollama's API on `rbee serve`, driven by the official `ollama` client (PyPI), with the real
model behind a real hive."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import ollama
import pytest

from rbee.errors import InvalidRequest
from rbee.gateway.main import prepare
from rbee.protocol.messages import DEFAULT_MODEL
from tests.integration.test_gateway import COLORS, STORY, Server, gateway, serving, start_hive

__all__ = ["gateway", "start_hive"]  # the fixtures, shared with the OpenAI tests
HI = [{"role": "user", "content": "hi"}]


def client_for(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def test_version_tags_show_and_ps(gateway: Server) -> None:
    client = client_for(gateway)
    version = httpx.get(gateway.url + "/api/version", timeout=10).json()["version"]
    assert tuple(int(n) for n in version.split(".")) >= (0, 6, 4)  # VS Code's minimum
    models = client.list().models
    names = [m.model for m in models]
    assert DEFAULT_MODEL in names, names
    ours = models[names.index(DEFAULT_MODEL)]
    assert ours.size and ours.size > 90_000_000 and ours.details is not None
    assert ours.details.format == "gguf" and ours.details.family == "llama"
    assert ours.details.quantization_level == "Q4_1" and ours.details.parameter_size == "134.52M"
    shown = client.show(DEFAULT_MODEL)
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert shown.capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    assert client.ps().models == []  # nothing loaded yet
    client.generate(DEFAULT_MODEL, STORY, options={"num_predict": 2})
    assert [m.model for m in client.ps().models] == [DEFAULT_MODEL]


def test_chat_streamed_and_whole_agree_and_report_counts(gateway: Server) -> None:
    client = client_for(gateway)
    messages = [{"role": "user", "content": COLORS}]
    options = {"temperature": 0, "num_predict": 24}
    whole = client.chat(DEFAULT_MODEL, messages=messages, options=options, stream=False)
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count and whole.eval_count <= 24  # it stops itself: "1. Red 2. Blue …"
    assert whole.done_reason == ("length" if whole.eval_count == 24 else "stop")
    assert whole.prompt_eval_count and whole.prompt_eval_count > 5
    assert (
        whole.eval_duration and whole.total_duration and whole.total_duration > whole.eval_duration
    )
    parts = list(client.chat(DEFAULT_MODEL, messages=messages, options=options, stream=True))
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_raw_and_templated(gateway: Server) -> None:
    client = client_for(gateway)
    raw = client.generate(
        DEFAULT_MODEL, STORY, raw=True, options={"temperature": 0, "num_predict": 16}
    )
    assert raw.done and raw.eval_count == 16 and raw.response.strip()
    assert raw.done_reason == "length"
    streamed = list(
        client.generate(
            DEFAULT_MODEL,
            STORY,
            raw=True,
            stream=True,
            options={"temperature": 0, "num_predict": 16},
        )
    )
    assert "".join(p.response for p in streamed) == raw.response
    chat_like = client.generate(
        DEFAULT_MODEL,
        COLORS,
        system="Answer briefly.",
        options={"temperature": 0, "num_predict": 8},
    )
    assert chat_like.done and chat_like.response and chat_like.response != raw.response


def test_errors_are_ollamas(gateway: Server) -> None:
    client = client_for(gateway)
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat("no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.status_code == 404 and "no-such-model" in unknown.value.error
    bad = httpx.post(
        gateway.url + "/api/generate",
        json={"model": DEFAULT_MODEL, "prompt": "x", "options": {"temperature": "hot"}},
        timeout=30,
    )
    assert bad.status_code == 400 and "options.temperature" in bad.json()["error"], bad.text
    unsupported = httpx.post(
        gateway.url + "/api/chat",
        json={"model": DEFAULT_MODEL, "messages": HI, "format": "yaml", "stream": False},
        timeout=30,
    )
    assert unsupported.status_code == 400 and "format" in unsupported.json()["error"]
    not_json = httpx.post(gateway.url + "/api/chat", content=b"{", timeout=30)
    assert not_json.status_code == 400 and "error" in not_json.json()
    # Unknown fields are ignored, as Ollama ignores them.
    extra = httpx.post(
        gateway.url + "/api/generate",
        json={
            "model": DEFAULT_MODEL,
            "prompt": STORY,
            "stream": False,
            "whatever": 1,
            "options": {"num_predict": 2, "mirostat": 0},
        },
        timeout=60,
    )
    assert extra.status_code == 200 and json.loads(extra.text)["eval_count"] == 2


def test_a_second_address_for_ollamas_clients(start_hive: Any) -> None:
    """`rbee serve --ollama-listen`: the same routes where Ollama's clients look; off loopback
    only with API keys, as the first address."""
    start_hive()
    with serving(ollama_listen="127.0.0.1:0") as server:
        assert server.ollama_url != server.url
        client = ollama.Client(host=server.ollama_url, timeout=60)
        assert DEFAULT_MODEL in [m.model for m in client.list().models]
    with pytest.raises(InvalidRequest, match=r"refusing to listen on 0\.0\.0\.0 without API keys"):
        prepare("127.0.0.1:0", ollama_listen="0.0.0.0:0")


def test_a_request_without_a_prompt_loads_or_unloads_the_model(gateway: Server) -> None:
    """Ollama's clients preload a model with an empty request, and unload it with keep_alive 0."""
    client = client_for(gateway)
    loaded = client.generate(DEFAULT_MODEL)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert [m.model for m in client.ps().models] == [DEFAULT_MODEL]
    chat = client.chat(DEFAULT_MODEL, messages=[])
    assert chat.done and chat.done_reason == "load" and chat.message.content == ""
    unloaded = client.generate(DEFAULT_MODEL, keep_alive=0)
    assert unloaded.done_reason == "unload"
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ps().models == []
