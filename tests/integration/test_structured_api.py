"""Structured output through `rbee serve`, driven by the official clients: OpenAI's
``chat.completions.parse`` with a pydantic model, Ollama's ``format``; and what a schema the
grammar compiler cannot handle gets (a 400 with the reason, never a 500)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import httpx
import openai
import pydantic
import pytest

from rbee.protocol.messages import DEFAULT_MODEL
from tests.integration.test_gateway import Server, client_for, gateway, start_hive
from tests.integration.test_ollama_api import client_for as ollama_client_for

__all__ = ["gateway", "start_hive"]
HI: Any = [{"role": "user", "content": "hi"}]

SUBJECTS = [
    "Paris", "the Moon", "bread", "the piano", "Mount Everest", "honey bees", "the Nile",
    "coffee", "the Internet", "volcanoes", "penguins", "chess", "rainbows", "the heart",
    "bicycles", "tea", "the Sahara", "whales", "libraries", "thunderstorms",
]  # fmt: skip


class Card(pydantic.BaseModel):
    """What the model is asked to fill: strings, a bounded integer, an enum and a short list."""

    subject: str = pydantic.Field(max_length=60)
    kind: Literal["place", "thing", "animal", "food", "event"]
    interest: int = pydantic.Field(ge=1, le=10)
    facts: list[Annotated[str, pydantic.Field(max_length=80)]] = pydantic.Field(
        min_length=1, max_length=3
    )


def test_parse_with_a_pydantic_model_validates_for_twenty_prompts(gateway: Server) -> None:
    def ask(subject: str) -> Card | None:
        reply = client.chat.completions.parse(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": f"Describe {subject} as a card."}],
            response_format=Card,
            max_tokens=600,
            temperature=0.7,
            seed=11,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        return choice.message.parsed

    with client_for(gateway) as client, ThreadPoolExecutor(4) as pool:
        cards = list(pool.map(ask, SUBJECTS))
    assert len(cards) == 20 and all(isinstance(c, Card) for c in cards)
    assert len({c.subject for c in cards if c}) > 1  # each prompt got its own answer


def test_json_object_mode_parses(gateway: Server) -> None:
    with client_for(gateway) as client:
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}],
            response_format={"type": "json_object"},
            max_tokens=300,
            seed=7,
        )
    content = reply.choices[0].message.content
    assert content is not None and isinstance(json.loads(content), dict), content


def test_ollama_format_schema_and_json(gateway: Server) -> None:
    client = ollama_client_for(gateway)
    reply = client.chat(
        DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Describe tea as a card."}],
        format=Card.model_json_schema(),
        options={"temperature": 0.7, "seed": 3, "num_predict": 400},
    )
    Card.model_validate_json(reply.message.content or "")
    generated = client.generate(
        DEFAULT_MODEL,
        "Give a JSON object with a name and an age.",
        format="json",
        options={"seed": 7, "num_predict": 300},
    )
    assert isinstance(json.loads(generated.response), dict), generated.response


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "grammar"),
        ({"$ref": "https://example.com/schema.json"}, "grammar"),
        ([1, 2], "must be a JSON schema"),
    ],
)
def test_a_schema_the_compiler_cannot_handle_is_a_400_with_the_reason(
    gateway: Server, schema: Any, reason: str
) -> None:
    with client_for(gateway) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=HI,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "response_format.json_schema.schema"
    assert reason in error["message"], error
    ollama_reply = httpx.post(
        gateway.url + "/api/chat",
        json={"model": DEFAULT_MODEL, "messages": HI, "format": schema, "stream": False},
        timeout=30,
    )
    assert ollama_reply.status_code == 400 and "format" in ollama_reply.json()["error"]
