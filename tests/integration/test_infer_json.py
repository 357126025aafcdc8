"""`rbee infer --format json` and `rbee infer --json-schema FILE`: the real command, the bundled
model, an ephemeral hive. The output is exactly one JSON document (any object, or one valid
against the schema); a schema file that cannot be read or enforced is refused before any hive
is asked, as is giving both flags."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest

from rbee.errors import ExitCode
from tests.helpers import run_rbee

SAMPLING = ("-t", "0.7", "--seed", "7", "-n", "300")
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)

    name: str
    age: int = pydantic.Field(ge=0, le=120)


def document(stdout: str) -> object:
    """The one JSON document printed (the keeper ends the output with a newline)."""
    assert stdout.endswith("\n"), repr(stdout)
    return json.loads(stdout)


def test_format_json_prints_one_object(rbee_env: dict[str, str]) -> None:
    prompt = "Give a JSON object with a name and an age."
    result = run_rbee("infer", "--format=json", *SAMPLING, prompt, env=rbee_env)
    assert result.returncode == 0, result.stderr
    assert isinstance(document(result.stdout), dict), result.stdout
    assert "stop: eos" in result.stderr, result.stderr  # the document ended, not the budget
    assert "[warning]" not in result.stderr


def test_json_schema_output_validates(rbee_env: dict[str, str], tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON_SCHEMA))
    prompt = "Give a JSON object with a name and an age."
    result = run_rbee("infer", "--json-schema", str(schema), *SAMPLING, prompt, env=rbee_env)
    assert result.returncode == 0, result.stderr
    value = document(result.stdout)
    assert isinstance(value, dict), result.stdout
    person = Person.model_validate(value)
    assert isinstance(person.name, str) and 0 <= person.age <= 120
    assert "stop: eos" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ('{"type": "number", "minimum": 0}', "cannot be enforced"),
        ('{"type": "object", "properties": {', "is not JSON"),
        ("[1, 2]", "must be a JSON schema"),
        (None, "cannot read it"),
    ],
    ids=["unenforceable", "not-json", "not-an-object", "missing"],
)
def test_a_bad_schema_file_is_refused_before_any_hive(
    rbee_env: dict[str, str], tmp_path: Path, content: str | None, said: str
) -> None:
    schema = tmp_path / "schema.json"
    if content is not None:
        schema.write_text(content)
    result = run_rbee("infer", "--json-schema", str(schema), "hi", env=rbee_env, timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "error: INVALID_REQUEST: " in result.stderr, result.stderr
    assert said in result.stderr and str(schema) in result.stderr, result.stderr
    assert "[hive]" not in result.stderr and "[preflight]" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_format_and_json_schema_exclude_each_other(
    rbee_env: dict[str, str], tmp_path: Path
) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON_SCHEMA))
    args = ("infer", "--format", "json", "--json-schema", str(schema), "hi")
    result = run_rbee(*args, env=rbee_env, timeout=60)
    assert result.returncode == ExitCode.USAGE
    assert "not allowed with argument" in result.stderr, result.stderr


def test_only_json_is_a_format(rbee_env: dict[str, str]) -> None:
    result = run_rbee("infer", "--format", "yaml", "hi", env=rbee_env, timeout=60)
    assert result.returncode == ExitCode.USAGE
    assert "invalid choice: 'yaml'" in result.stderr, result.stderr


def test_a_document_cut_off_by_the_token_budget_is_said(rbee_env: dict[str, str]) -> None:
    prompt = "Give a JSON object with a name and an age."
    result = run_rbee("infer", "--format", "json", "-n", "3", prompt, env=rbee_env)
    assert result.returncode == 0, result.stderr
    assert "stop: length" in result.stderr, result.stderr
    assert "[warning] the output stopped before the JSON document's end" in result.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)
