"""Structured output up front: which request fields become which grammar, and schemas the
converter cannot handle refused with the reason (a 400 before any worker runs)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from rbee import grammar, int_range
from rbee.errors import InvalidRequest
from rbee.gateway.errors import BadParameter
from rbee.gateway.ollama import translate
from rbee.gateway.params import parse_call

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def grammar_of(**fields: Any) -> str:
    return parse_call("chat", chat(**fields), allow_local_models=False).params.grammar


def test_each_way_of_asking_for_json_gives_its_grammar() -> None:
    person = grammar.from_schema(PERSON)
    assert "name-kv" in person and "age-kv" in person and "root ::=" in person
    assert grammar_of() == "" and grammar_of(response_format={"type": "text"}) == ""
    assert grammar_of(response_format={"type": "json_object"}) == grammar.any_json_object()
    assert grammar_of(response_format={"type": "json_object", "schema": PERSON}) == person
    openai = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    assert grammar_of(response_format=openai) == person
    assert grammar_of(json_schema=PERSON) == person  # llama-server's extension
    assert grammar_of(grammar='root ::= "yes" | "no"') == 'root ::= "yes" | "no"'


def test_ollama_format_maps_onto_response_format() -> None:
    as_json = translate("chat", {"model": "m", "messages": [], "format": "json"})
    assert as_json["response_format"] == {"type": "json_object"}
    schema = translate("chat", {"model": "m", "messages": [], "format": PERSON})
    assert schema["response_format"]["json_schema"]["schema"] == PERSON
    assert "response_format" not in translate("chat", {"model": "m", "messages": [], "format": ""})


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"$ref": "https://example.com/s.json"}, "cannot be turned into a grammar"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "grammar"),
        ({"type": "strange"}, "grammar"),
        ({"x": "y" * 70_000}, "the limit is"),
        ({"type": "number", "minimum": 0}, "'minimum' at / is supported on integers only"),
        ({"properties": {"e": {"type": "string", "format": "email"}}}, "format 'email' at /pro"),
        ({"items": {"uniqueItems": True}}, "'uniqueItems' at /items is not supported"),
        ({"anyOf": [{"type": "integer", "minimum": 3, "maximum": 2}]}, "no integer lies"),
        ({"$defs": {"a": {"type": "integer", "multipleOf": 2}}}, "'multipleOf' at /$defs/a"),
        ({"type": ["integer", "null"], "maxLength": 3}, "a list of types at /"),
    ],
)
def test_a_schema_the_converter_cannot_handle_is_a_400_with_the_reason(
    schema: dict[str, Any], reason: str
) -> None:
    with pytest.raises(BadParameter) as refused:
        grammar_of(response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert refused.value.param == "response_format.json_schema.schema"
    assert reason in refused.value.message and refused.value.code == "INVALID_REQUEST"


def test_not_a_schema_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="must be a JSON schema"):
        grammar.from_schema(["not", "an", "object"], "format")


def test_strings_hold_no_raw_control_characters() -> None:
    """The port's own string rule lets a newline into a string, which no JSON parser takes."""
    text = grammar.from_schema({"type": "object", "properties": {"s": {"type": "string"}}})
    char = next(line for line in text.splitlines() if line.startswith("char ::="))
    assert char == "char ::= " + grammar.JSON_CHAR and r"\x00-\x1F" in char


def test_a_property_named_like_a_keyword_is_a_name_not_a_keyword() -> None:
    schema = {"type": "object", "properties": {"not": {"type": "string"}}, "required": ["not"]}
    assert "not-kv" in grammar.from_schema(schema)


def as_regex(lo: int | None, hi: int | None) -> re.Pattern[str]:
    """int_range's runs as a regular expression, to check them against Python's integers."""

    def one(classes: list[str], more: bool) -> str:
        digits = "".join(re.escape(c) if len(c) == 1 else f"[{c}]" for c in classes)
        return digits + (f"[0-9]{{0,{int_range.OPEN_DIGITS}}}" if more else "")

    return re.compile("|".join(one(*run) for run in int_range.alternatives(lo, hi)))


BOUNDS = [None, -1000, -101, -100, -99, -10, -9, -1, 0, 1, 7, 9, 10, 11, 99, 100, 234, 1000]


@pytest.mark.parametrize(("lo", "hi"), list(itertools.product(BOUNDS, BOUNDS)))
def test_integer_bounds_allow_exactly_the_integers_between(lo: int | None, hi: int | None) -> None:
    if lo is not None and hi is not None and lo > hi:
        with pytest.raises(ValueError, match="no integer"):
            int_range.alternatives(lo, hi)
        return
    pattern = as_regex(lo, hi)
    for n in [*range(-1100, 1100), -(10**9), 10**9, 123456789012]:
        allowed = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == allowed, n
    for text in ("-0", "007", "00", "01", "-01", "+1", ""):  # not how JSON writes a number
        assert not pattern.fullmatch(text), text


def test_integer_bounds_in_a_schema_become_the_range_rule() -> None:
    schema = {"type": "integer", "exclusiveMinimum": 0.5, "maximum": 12}
    assert grammar.from_schema(schema).startswith("root ::= " + int_range.gbnf(1, 12))
    draft4 = {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 3}
    assert int_range.gbnf(1, 3) in grammar.from_schema(draft4)
