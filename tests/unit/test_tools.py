"""Reading tool calls out of an answer, whole and streamed, and checking what a request offers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rbee.gateway.errors import BadParameter
from rbee.gateway.params import parse_call
from rbee.gateway.tools import ToolStream, parse_tools, split_calls

NAMES = {"get_weather", "get_time"}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME_CALL = '{"name": "get_time", "arguments": {}}'


def arguments(call: dict[str, Any]) -> Any:
    return json.loads(call["function"]["arguments"])


@pytest.mark.parametrize(
    ("text", "content", "found"),
    [
        (f"<tool_call>\n{CALL}\n</tool_call>", "", [("get_weather", {"city": "Paris"})]),
        (
            f"Let me look.\n<tool_call>{CALL}</tool_call>",
            "Let me look.",
            [("get_weather", {"city": "Paris"})],
        ),
        (
            f"<tool_call>{CALL}</tool_call><tool_call>" + TIME_CALL,
            "",
            [("get_weather", {"city": "Paris"}), ("get_time", {})],
        ),
        (
            '{"name": "get_time", "parameters": {"zone": "UTC"}}',
            "",
            [("get_time", {"zone": "UTC"})],
        ),
        (
            '{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}',
            "",
            [("get_time", {"zone": "UTC"})],
        ),
        (
            '{"name": "unknown_tool", "arguments": {}}',
            '{"name": "unknown_tool", "arguments": {}}',
            [],
        ),
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        ("Just an answer.", "Just an answer.", []),
    ],
)
def test_split_calls(text: str, content: str, found: list[tuple[str, Any]]) -> None:
    got_content, calls = split_calls(text, NAMES)
    assert got_content == content
    assert [(c["function"]["name"], arguments(c)) for c in calls] == found
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)


def stream(pieces: list[str]) -> tuple[str, str, list[dict[str, Any]]]:
    held = ToolStream(NAMES)
    sent = "".join(held.feed(p) for p in pieces)
    rest, calls = held.end()
    return sent, rest, calls


def test_streamed_text_goes_out_until_it_could_be_a_call() -> None:
    sent, rest, calls = stream(["Let ", "me look.", "\n<tool", "_call>", CALL, "</tool_call>"])
    assert sent == "Let me look.\n" and rest == "" and len(calls) == 1
    sent, rest, calls = stream(["Hello", " <to", "morrow> is", " fine"])
    assert sent + rest == "Hello <tomorrow> is fine" and not calls
    sent, rest, calls = stream(["  ", '{"name": "get_time",', ' "arguments": {}}'])
    assert sent == "" and rest == "" and calls[0]["function"]["name"] == "get_time"
    sent, rest, calls = stream(['{"a":', " 1}"])  # JSON that is no call is content, at the end
    assert sent == "" and rest == '{"a": 1}' and not calls


def tools_of(**fields: Any) -> Any:
    return parse_tools({"model": "m", "messages": [], **fields})


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


def test_tool_choice() -> None:
    assert tools_of() is None and tools_of(tool_choice="none") is None
    assert tools_of(tools=[WEATHER], tool_choice="none") is None
    auto = tools_of(tools=[WEATHER])
    assert auto is not None and auto.forced == "" and auto.names == {"get_weather"}
    required = tools_of(tools=[WEATHER], tool_choice="required")
    assert required is not None and "get_weather" in required.forced
    old = tools_of(functions=[{"name": "get_weather"}], function_call={"name": "get_weather"})
    assert old is not None and old.forced


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_tools_are_refused_by_name(fields: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(BadParameter) as refused:
        parse_call("chat", body, allow_local_models=False)
    assert refused.value.param == param, refused.value.message


def test_earlier_calls_and_results_travel_to_the_template() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "tools": [WEATHER],
    }
    call = parse_call("chat", body, allow_local_models=False)
    _, assistant, tool = call.params.messages
    assert json.loads(assistant.tool_calls)[0]["function"]["name"] == "get_weather"
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "c1", "sunny")
    assert json.loads(call.params.tools)[0]["function"]["name"] == "get_weather"
