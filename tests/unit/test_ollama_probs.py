"""Unit tests for rbee.gateway.ollama_probs: what an Ollama body asks for, and the shape of
the ``logprobs`` list its answer carries."""

from __future__ import annotations

from typing import Any

import pytest

from rbee.gateway.errors import BadParameter
from rbee.gateway.ollama_probs import entries, requested
from rbee.protocol.messages import Alternative, TokenProb


@pytest.mark.parametrize(
    ("body", "alternatives"),
    [
        ({}, -1),
        ({"logprobs": False}, -1),
        ({"logprobs": False, "top_logprobs": 3}, -1),  # as Ollama: nothing without logprobs
        ({"top_logprobs": 3}, -1),
        ({"logprobs": True}, 0),
        ({"logprobs": True, "top_logprobs": 0}, 0),
        ({"logprobs": True, "top_logprobs": 20}, 20),
    ],
)
def test_requested(body: dict[str, Any], alternatives: int) -> None:
    assert requested(body) == alternatives


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2.5}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_a_bad_field_is_named(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadParameter) as raised:
        requested(body)
    assert raised.value.param == field


def test_entries_are_ollamas_shape_with_empty_fields_left_out() -> None:
    alone = TokenProb(piece=b" Red", logprob=-0.25)
    ranked = TokenProb(
        piece=b"\xc3",  # half of "é": the bytes say what the text cannot
        logprob=-1.5,
        top=[Alternative(piece=b"\xc3", logprob=-1.5), Alternative(piece=b"e", logprob=-2.0)],
    )
    assert entries([alone, ranked]) == [
        {"token": " Red", "logprob": -0.25, "bytes": [32, 82, 101, 100]},
        {
            "token": "\ufffd",
            "logprob": -1.5,
            "bytes": [195],
            "top_logprobs": [
                {"token": "\ufffd", "logprob": -1.5, "bytes": [195]},
                {"token": "e", "logprob": -2.0, "bytes": [101]},
            ],
        },
    ]
