"""Ollama's request shapes → the gateway's OpenAI ones (rbee.gateway.ollama), pure pieces."""

from __future__ import annotations

import pytest

from rbee.gateway.errors import BadParameter
from rbee.gateway.ollama import _keep_alive, _parameter_size, named_for_ollama, translate
from rbee.gateway.params import parse_call


def test_chat_options_become_openai_fields() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "images": None}],
        "options": {"temperature": 0.2, "num_predict": 7, "top_k": 5, "seed": 3, "num_ctx": 9},
        "whatever": True,
    }
    out = translate("chat", body)
    assert out == {
        "model": "m",
        "stream": True,  # Ollama streams unless told not to
        "temperature": 0.2,
        "max_tokens": 7,
        "top_k": 5,
        "seed": 3,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert "num_predict" not in translate("chat", {**body, "options": {"num_predict": -1}})
    assert "max_tokens" not in translate("chat", {**body, "options": {"num_predict": -1}})


def test_generate_raw_or_templated_with_its_system_prompt() -> None:
    raw = translate("completion", {"model": "m", "prompt": "Once", "raw": True, "stream": False})
    assert raw == {"model": "m", "stream": False, "prompt": "Once"}
    templated = translate("completion", {"model": "m", "prompt": "Hi", "system": "Be brief."})
    assert templated["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "m", "messages": [], "format": "yaml"}, "format"),
        ({"model": "m", "messages": [], "images": ["aGk="]}, "images"),
        ({"model": "m", "messages": [], "options": []}, "options"),
        ({"model": "m", "messages": [], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": "hi"}, "messages"),
    ],
)
def test_what_rbee_cannot_honour_is_refused_by_name(body: dict[str, object], field: str) -> None:
    with pytest.raises(BadParameter) as refused:
        translate("chat", body)
    assert refused.value.param == field and field in refused.value.message


def test_a_bad_option_is_named_as_ollama_names_it() -> None:
    body = translate("chat", {"model": "m", "messages": [], "options": {"num_predict": 0}})
    body["messages"] = [{"role": "user", "content": "x"}]
    with pytest.raises(BadParameter) as bad:
        parse_call("chat", body, allow_local_models=False)
    renamed = named_for_ollama(bad.value)
    assert renamed.param == "options.num_predict" and "options.num_predict" in renamed.message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 300.0),
        (0, 0.0),
        (30, 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("-1", -1.0),
        (-5, -1.0),
    ],
)
def test_keep_alive_as_ollama_writes_it(value: object, seconds: float) -> None:
    assert _keep_alive({"keep_alive": value} if value is not None else {}, 300.0) == seconds


@pytest.mark.parametrize("value", ["soon", True, "5 minutes", [1]])
def test_a_bad_keep_alive_is_refused(value: object) -> None:
    with pytest.raises(BadParameter, match="keep_alive"):
        _keep_alive({"keep_alive": value}, 300.0)


def test_parameter_sizes() -> None:
    assert [_parameter_size(n) for n in (134_515_008, 7_615_616_512, 70_000, 12)] == [
        "134.52M",
        "7.62B",
        "70K",
        "12",
    ]
