"""Constrained decoding in the batched worker: a real hive, one worker with several slots, the
real model. Each stream follows its own grammar while sharing decode steps with the others;
a grammar llama.cpp cannot parse ends that stream alone with INVALID_REQUEST."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pydantic
import pytest

from rbee import grammar
from rbee.protocol.messages import ChatMessage, Done, GenerateParams, StreamError
from tests.helpers import hive_in_thread, keeper
from tests.integration.test_batching import Run, run_together
from tests.integration.test_hive_worker import MODEL, ensure


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


class Answer(pydantic.BaseModel):
    """Bounded, so the document ends within the token limit whatever the batch's arithmetic
    makes the sampler draw (unbounded reasons ran to the limit once in a loaded CI run)."""

    answer: bool
    reasons: list[Annotated[str, pydantic.StringConstraints(max_length=60)]] = pydantic.Field(
        max_length=3
    )


SCHEMAS: list[type[pydantic.BaseModel]] = [City, Answer]


@pytest.fixture
def data_dir(tmp_path: Path, rbee_env: dict[str, str]) -> Path:
    return tmp_path / "data"


def constrained(prompt: str, gbnf: str, **extra: Any) -> GenerateParams:
    return GenerateParams(
        prompt="",
        messages=[ChatMessage(role="user", content=prompt)],
        max_tokens=200,
        temperature=0.7,
        seed=7,
        grammar=gbnf,
        **extra,
    )


def test_each_stream_of_a_batch_follows_its_own_grammar(data_dir: Path) -> None:
    """Four streams at once: two schemas, free JSON, and free text, on one 4-slot worker; every
    constrained output parses (and validates), and ends at the document's end even with
    ignore_eos; a fifth job with a broken grammar fails alone, with llama.cpp's reason."""
    with hive_in_thread(data_dir, parallel=4) as hive, keeper(hive) as (client, _):
        assigned, _ = ensure(client, MODEL)
        runs = [
            Run(
                "j-city",
                constrained("Describe Paris.", grammar.from_schema(City.model_json_schema())),
            ),
            Run(
                "j-answer",
                constrained(
                    "Is the sea salty?",
                    grammar.from_schema(Answer.model_json_schema()),
                    ignore_eos=True,
                ),
            ),
            Run(
                "j-object",
                constrained(
                    "Give a JSON object with a name and an age.", grammar.any_json_object()
                ),
            ),
            Run("j-free", constrained("Say hello.", "")),
            Run("j-broken", constrained("Anything.", 'root ::= "a" undefined-rule')),
        ]
        run_together(hive, assigned.worker_id, runs)
    city, answer, obj, free, broken = runs
    for run, schema in ((city, City), (answer, Answer)):
        assert isinstance(run.end, Done) and run.end.stop_reason == "eos", (run.end, run.text)
        schema.model_validate_json(run.text)
    assert isinstance(obj.end, Done) and isinstance(json.loads(obj.text), dict), obj.text
    assert isinstance(free.end, Done) and free.text
    assert isinstance(broken.end, StreamError) and broken.end.code == "INVALID_REQUEST"
    assert "grammar" in broken.end.message
