"""Never a 500 from a bad body: every way into the gateway's validation (OpenAI chat,
completions and embeddings; Ollama chat, generate and embed) is fed request bodies whose
fields are replaced by random JSON values. Each must validate or raise InvalidRequest (a 400
naming the field): any other exception would reach the client as a 500."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from rbee.errors import InvalidRequest
from rbee.gateway import embeddings, ollama
from rbee.gateway.params import parse_call

SEED = 20261207
BODIES = 4000
TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
    },
}
CHAT = {
    "model": "m",
    "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "1"},
    ],
    "tools": [TOOL],
    "tool_choice": "auto",
    "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    "logprobs": True,
    "top_logprobs": 2,
    "max_tokens": 5,
    "temperature": 0.5,
    "stop": ["x"],
    "stream": True,
    "stream_options": {"include_usage": True},
}
FORCED = {k: v for k, v in CHAT.items() if k != "response_format"} | {"tool_choice": "required"}
COMPLETION = {"model": "m", "prompt": "hi", "logprobs": 2, "max_tokens": 3, "seed": 1}
EMBED = {"model": "m", "input": ["a", "b"], "dimensions": 8, "truncate": True}
OLLAMA_CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "format": {"type": "object"},
    "options": {"temperature": 0.2, "num_predict": 4, "stop": ["x"]},
    "tools": [TOOL],
    "keep_alive": "5m",
}


def value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, nested a little."""
    kinds = ["null", "bool", "int", "float", "str", "list", "dict"][: 7 if depth < 2 else 5]
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2**31, -(2**63), rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1.5, 1e308, float("nan"), float("inf")])
    if kind == "str":
        return rng.choice(["", "x", "json", "auto", "none", "required", "{", "é" * 3, "user"])
    if kind == "list":
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["type", "name", "role", "content", "schema"]): value(rng, depth + 1)}


def mutated(rng: random.Random, body: dict[str, Any]) -> Any:
    """``body`` with some field (perhaps a nested one) replaced, dropped or added."""
    if rng.random() < 0.02:
        return value(rng)
    out: Any = _copy(body)
    target = out
    for _ in range(rng.randint(0, 3)):  # walk down into a nested map or list
        inner = [v for v in (target.values() if isinstance(target, dict) else target)]
        inner = [v for v in inner if isinstance(v, dict | list) and v]
        if not inner:
            break
        target = rng.choice(inner)
    if isinstance(target, list):
        target[rng.randrange(len(target))] = value(rng)
    elif target and rng.random() < 0.8:
        key = rng.choice(list(target))
        if rng.random() < 0.2:
            del target[key]
        else:
            target[key] = value(rng)
    else:
        target[rng.choice(["extra", "n", "format", "input"])] = value(rng)
    return out


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


ROUTES: list[tuple[str, dict[str, Any], Callable[[Any], Any]]] = [
    ("chat", CHAT, lambda b: parse_call("chat", b, allow_local_models=False)),
    ("forced tool call", FORCED, lambda b: parse_call("chat", b, allow_local_models=False)),
    ("completion", COMPLETION, lambda b: parse_call("completion", b, allow_local_models=False)),
    ("embeddings", EMBED, lambda b: embeddings.parse(b, allow_local_models=False)),
    (
        "ollama chat",
        OLLAMA_CHAT,
        lambda b: (
            ollama._keep_alive(b, 300.0),
            parse_call("chat", ollama.translate("chat", b), allow_local_models=False),
        ),
    ),
]


@pytest.mark.parametrize(("name", "seed_body", "parse"), ROUTES, ids=[r[0] for r in ROUTES])
def test_random_bodies_give_400s_never_500s(
    name: str, seed_body: dict[str, Any], parse: Callable[[Any], Any]
) -> None:
    parse(_copy(seed_body))  # the seed itself is valid
    rng = random.Random(f"{SEED}-{name}")
    refused = 0
    for _ in range(BODIES):
        body = mutated(rng, seed_body)
        try:
            parse(body)
        except InvalidRequest:
            refused += 1
        except Exception as exc:  # pragma: no cover - the failure being looked for
            raise AssertionError(f"{type(exc).__name__}: {exc} for {body!r:.400}") from exc
    assert BODIES // 10 < refused < BODIES  # the mutations both break and keep bodies
