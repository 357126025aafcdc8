"""Tool calls through `rbee serve` with the official `openai` client: the default model's
weights with a chat template that renders tools (written into a copy of the GGUF), a real hive.

The 135M model rarely chooses to call a tool by itself, so the calls tested are forced
(``tool_choice`` required or named: a grammar makes the call parse and follow the tool's
parameters); ``auto`` is checked for a well-formed answer either way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from rbee.protocol.messages import DEFAULT_MODEL
from tests.gguf_edit import copy_with
from tests.helpers import run_rbee
from tests.integration.test_gateway import Server, client_for, gateway, start_hive
from tests.integration.test_ollama_api import client_for as ollama_client_for
from tests.tool_template import TOOLS_TEMPLATE

__all__ = ["gateway", "start_hive"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    target = tmp_path_factory.mktemp("tools") / "smollm2-tools.gguf"
    copy_with(model_path, target, {"tokenizer.chat_template": TOOLS_TEMPLATE})
    yield f"file:{target}"


def test_a_required_call_parses_and_follows_the_parameters(
    gateway: Server, tool_model: str
) -> None:
    with client_for(gateway) as client:
        reply = client.chat.completions.create(
            model=tool_model,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=200,
            seed=3,
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(arguments["city"], str) and arguments["unit"] in ("celsius", "fahrenheit")


def test_a_named_call_streams_as_openai_streams_it(gateway: Server, tool_model: str) -> None:
    with client_for(gateway) as client:
        stream = client.chat.completions.create(
            model=tool_model,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=200,
            stream=True,
        )
        chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert calls and all(c.index == 0 for c in calls)
    assert calls[0].function and calls[0].function.name == "get_weather"
    arguments = "".join(c.function.arguments or "" for c in calls if c.function)
    assert set(json.loads(arguments)) == {"city", "unit"}
    assert not any(d.content for d in deltas)  # the call is not also sent as text
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_goes_back_to_the_model(gateway: Server, tool_model: str) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    with client_for(gateway) as client:
        first = client.chat.completions.create(
            model=tool_model, messages=ASK, tools=[WEATHER], max_tokens=1
        )
        answered = client.chat.completions.create(
            model=tool_model,
            messages=[
                *ASK,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
            ],
            tools=[WEATHER],
            max_tokens=40,
            seed=1,
        )
    choice = answered.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert first.usage and answered.usage
    assert answered.usage.prompt_tokens > first.usage.prompt_tokens + 20  # call and result


def test_auto_gives_content_or_calls(gateway: Server, tool_model: str) -> None:
    with client_for(gateway) as client:
        reply = client.chat.completions.create(
            model=tool_model, messages=ASK, tools=[WEATHER], max_tokens=60, seed=5
        )
    message = reply.choices[0].message
    if reply.choices[0].finish_reason == "tool_calls":
        assert message.tool_calls and message.tool_calls[0].function.name == "get_weather"
    else:
        assert message.content and not message.tool_calls


def test_tools_are_refused_where_they_cannot_work(gateway: Server, tool_model: str) -> None:
    with client_for(gateway) as client:
        with pytest.raises(openai.BadRequestError) as no_template:
            client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=[WEATHER])
        assert "does not support tools" in str(no_template.value)
        bad = {"type": "function", "function": {"name": "x", "parameters": {"multipleOf": 2}}}
        with pytest.raises(openai.BadRequestError) as unenforceable:
            client.chat.completions.create(
                model=tool_model, messages=ASK, tools=[bad], tool_choice="required"
            )
        body = unenforceable.value.body
        assert isinstance(body, dict) and body["param"] == "tools[0].function.parameters"
        with pytest.raises(openai.BadRequestError) as unknown:
            client.chat.completions.create(
                model=tool_model,
                messages=ASK,
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            )
        assert "nope" in str(unknown.value)


def test_ollama_chat_with_tools(gateway: Server, tool_model: str) -> None:
    """Ollama's client: tools offered (Ollama lets the model decide), a call and its result
    sent back in Ollama's shape (arguments as an object, the tool's answer by name)."""
    client = ollama_client_for(gateway)
    reply = client.chat(
        tool_model, messages=ASK, tools=[WEATHER], options={"seed": 5, "num_predict": 80}
    )
    calls = reply.message.tool_calls or []
    assert reply.message.content or calls
    assert all(
        c.function.name == "get_weather" and isinstance(c.function.arguments, dict) for c in calls
    )
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "function": {
                        "name": "get_weather",
                        "arguments": {"city": "Paris", "unit": "celsius"},
                    }
                }
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "18 degrees, sunny"},
    ]
    streamed = list(
        client.chat(
            tool_model, messages=history, tools=[WEATHER], stream=True, options={"num_predict": 30}
        )
    )
    assert streamed[-1].done and (streamed[-1].prompt_eval_count or 0) > 100
    plain = client.chat(  # no tools: any model
        DEFAULT_MODEL, messages=ASK, tools=[], options={"num_predict": 20}
    )
    assert plain.message.content


def test_show_says_which_models_take_tools(
    gateway: Server, tool_model: str, rbee_env: dict[str, str]
) -> None:
    """VS Code's agent mode looks for the "tools" capability in /api/show."""
    path = tool_model.removeprefix("file:")
    imported = run_rbee("models", "import", path, "--name", "smollm2-tools", env=rbee_env)
    assert imported.returncode == 0, imported.stderr
    client = ollama_client_for(gateway)
    assert "tools" in (client.show("smollm2-tools").capabilities or [])
    assert "tools" not in (client.show(DEFAULT_MODEL).capabilities or [])
