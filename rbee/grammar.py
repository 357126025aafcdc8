"""Structured output: the llama.cpp grammar (GBNF) that makes a model's output parse as JSON,
or validate against a JSON schema.

The worker adds the grammar to a sequence's sampler chain (rbee.worker.engine), so every token
drawn keeps the text a prefix of some valid document and the end of generation comes only once
the document is whole: the output always parses, as with llama-server's ``json_schema`` and
Ollama's ``format``. The schema → GBNF converter is llama.cpp's own (llama-cpp-python ships its
Python port, ``llama_cpp.llama_grammar``, which needs no model), taught integer bounds
(rbee.int_range), which the port ignores. Keywords it would ignore silently are refused here,
in the keeper, as is anything it cannot convert: the request gets a 400 with the reason before
any worker runs, never an answer that breaks its own schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from rbee import int_range
from rbee.errors import InvalidRequest
from rbee.protocol.messages import MAX_GRAMMAR_CHARS

MAX_SCHEMA_CHARS = 64 * 1024
SUGGESTION = "use the JSON schema features llama.cpp's converter supports (no remote $ref)"
# Keywords that constrain a document but that the converter would pass over.
IGNORED = {
    "multipleOf", "uniqueItems", "not", "if", "then", "else", "minProperties", "maxProperties",
    "patternProperties", "propertyNames", "contains", "dependentRequired", "dependentSchemas",
    "unevaluatedProperties", "unevaluatedItems",
}  # fmt: skip
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
FORMATS = ("date", "time", "date-time", "uuid")  # the converter's; others would be ignored
# A character of a JSON string, as llama.cpp's C++ converter writes it
JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
# Where a schema holds further schemas: one, a list of them, a map of names to them
SUBSCHEMA = ("items", "additionalProperties")
SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def _converter() -> Any:
    """llama-cpp-python's port of llama.cpp's json-schema-to-grammar (imported on first use:
    it loads the engine's library, which a keeper otherwise never needs)."""
    from llama_cpp import llama_grammar

    return llama_grammar


def any_json_object() -> str:
    """A grammar for any JSON object (OpenAI's ``json_object``, Ollama's ``"json"``)."""
    grammar: str = _converter().JSON_GBNF
    return grammar


def from_schema(schema: Any, where: str = "schema") -> str:
    """A grammar for documents that validate against the JSON ``schema``; InvalidRequest, naming
    ``where``, when it is no schema or uses what the converter cannot express."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON schema (an object)")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{where} is not JSON: {exc}") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidRequest(f"{where} has {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}")
    problem = unsupported(schema, "")
    if problem:
        raise InvalidRequest(f"{where} cannot be enforced: {problem}", suggestion=SUGGESTION)
    try:
        grammar = _convert(json.loads(text))
    except Exception as exc:  # whatever the converter trips on, it is the schema's: a 400
        raise InvalidRequest(
            f"{where} cannot be turned into a grammar: {str(exc) or type(exc).__name__}",
            suggestion=SUGGESTION,
        ) from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{where} makes a grammar over {MAX_GRAMMAR_CHARS} characters")
    return grammar


def unsupported(schema: Any, path: str) -> str:
    """The first thing in ``schema`` (at JSON pointer ``path``) that the converter would ignore,
    so that output could break the schema; "" when there is none."""
    if not isinstance(schema, dict):
        return ""  # true/false schemas, or what the converter itself will refuse
    here = path or "/"
    ignored = sorted(IGNORED & schema.keys())
    if ignored:
        return f"{ignored[0]!r} at {here} is not supported"
    kind = schema.get("type")
    bounded = [k for k in BOUNDS if k in schema]
    if bounded and kind != "integer":
        return f"{bounded[0]!r} at {here} is supported on integers only"
    if isinstance(kind, list) and len(schema.keys() - {"type", "title", "description"}) > 0:
        return f"a list of types at {here} takes no other keywords (use anyOf)"
    fmt = schema.get("format")
    if fmt is not None and kind in (None, "string") and fmt not in FORMATS:
        return f"format {fmt!r} at {here} is not supported (only {', '.join(FORMATS)})"
    if bounded:
        try:
            _integer_bounds(schema)
        except ValueError as exc:
            return f"{exc} at {here}"
    return next((p for sub, at in _subschemas(schema, path) if (p := unsupported(sub, at))), "")


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    """The schemas directly inside ``schema``, each with its JSON pointer."""
    for key in SUBSCHEMA:
        yield schema.get(key), f"{path}/{key}"
    for key in SUBSCHEMA_LISTS:
        subs = schema.get(key)
        yield from ((sub, f"{path}/{key}/{i}") for i, sub in enumerate(subs or []))
    for key in SUBSCHEMA_MAPS:
        subs = schema.get(key)
        if isinstance(subs, dict):
            yield from ((sub, f"{path}/{key}/{name}") for name, sub in subs.items())


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The least and greatest integer a schema's bounds allow (draft 4's boolean exclusive
    forms too); ValueError when none does or a bound is not a number."""

    def number(key: str) -> float | None:
        value = schema.get(key)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{key!r} must be a number")
        return value

    lo: float = -math.inf
    hi: float = math.inf
    if (value := number("minimum")) is not None:
        lo = math.floor(value) + 1 if schema.get("exclusiveMinimum") is True else math.ceil(value)
    if (value := number("maximum")) is not None:
        hi = math.ceil(value) - 1 if schema.get("exclusiveMaximum") is True else math.floor(value)
    if (value := number("exclusiveMinimum")) is not None:
        lo = max(lo, math.floor(value) + 1)
    if (value := number("exclusiveMaximum")) is not None:
        hi = min(hi, math.ceil(value) - 1)
    if lo > hi:
        raise ValueError(f"no integer lies between the bounds ({lo} > {hi})")
    return (None if lo == -math.inf else int(lo)), (None if hi == math.inf else int(hi))


def _convert(schema: dict[str, Any]) -> str:
    """The port's conversion, with integer bounds as rbee.int_range's rules and strings
    without raw control characters."""
    port = _converter()

    class Converter(port.SchemaConverter):  # type: ignore[misc, name-defined]
        def visit(self, node: dict[str, Any], name: str) -> str:
            if isinstance(node, dict) and node.get("type") == "integer":
                lo, hi = _integer_bounds(node)
                if lo is not None or hi is not None:
                    rule = name + "-" if name in port.RESERVED_NAMES else name or "root"
                    return str(self._add_rule(rule, int_range.gbnf(lo, hi) + " space"))
            return str(super().visit(node, name))

        def _add_primitive(self, name: str, rule: Any) -> str:
            if name == "char":  # the port lets control characters into strings: JSON does not
                rule = port.BuiltinRule(JSON_CHAR, [])
            return str(super()._add_primitive(name, rule))

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "input"), "")
    grammar: str = converter.format_grammar()
    return grammar
