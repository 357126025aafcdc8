"""Tool calls: OpenAI's ``tools`` and ``tool_choice`` in, ``tool_calls`` out.

The tools go to the worker, whose chat template renders them in the model's own words
(rbee.worker.template); the model answers with calls in its own format, which is read here:
Hermes/Qwen's ``<tool_call>{"name": …, "arguments": …}</tool_call>`` blocks (any text before
them is the message's content), or, the whole answer, one bare JSON object with ``name`` and
``arguments`` (or ``parameters``, Llama 3.1's word). An answer holding neither is plain content.

``tool_choice`` ``"required"`` or a named function forces a call with a grammar (rbee.grammar):
one bare JSON object whose name is an offered tool's and whose arguments follow that tool's
parameter schema, so a forced call always parses and validates. ``"none"`` offers no tools.

Streamed, text goes out as content until it could be the start of a call; from there it is held,
and at the end it becomes ``tool_calls`` deltas (each call whole in one delta, which OpenAI's
clients accumulate like any other) or, if it was no call after all, content.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from rbee import grammar
from rbee.errors import InvalidRequest
from rbee.gateway.errors import BadParameter

MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # OpenAI's rule for a function's name
OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class Tools:
    """A request's validated tools and how they may be used."""

    tools: list[dict[str, Any]]
    forced: str  # "" (the model decides), else the grammar of the call it must make

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def wire(self) -> str:
        """The tools as GenerateParams carries them to the template."""
        return json.dumps(self.tools)


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """``tools`` and ``tool_choice`` (or the older ``functions``/``function_call``); None when
    no tool is offered or ``tool_choice`` is ``"none"``."""
    tools = body.get("tools")
    if tools is None and body.get("functions") is not None:  # the deprecated form
        tools = [{"type": "function", "function": f} for f in _list(body, "functions")]
    choice = body.get("tool_choice", body.get("function_call"))
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise BadParameter("tool_choice", "tool_choice needs tools")
        return None
    checked = _tools(_list(body, "tools") if "tools" in body else tools)
    if choice in (None, "auto"):
        return Tools(checked, "")
    if choice == "none":
        return None
    if choice == "required":
        return Tools(checked, _forced(list(enumerate(checked))))
    name = _chosen(choice)
    chosen = [(i, t) for i, t in enumerate(checked) if t["function"]["name"] == name]
    if not chosen:
        raise BadParameter("tool_choice", f"tool_choice names {name!r}, which is not in tools")
    return Tools(checked, _forced(chosen))


def _list(body: dict[str, Any], field: str) -> list[Any]:
    value = body.get(field)
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise BadParameter(field, f"{field} must be a list of at most {MAX_TOOLS} tools")
    return value


def _tools(tools: list[Any]) -> list[dict[str, Any]]:
    """Each tool as the template reads it: type function, a name, a description, parameters."""
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadParameter(f"{where}.type", f"{where} must be a function tool")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise BadParameter(f"{where}.function", f"{where}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in seen:
            raise BadParameter(
                f"{where}.function.name",
                f"{where}.function.name must be a new name of letters, digits, _ . - (≤ 64)",
            )
        seen.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise BadParameter(f"{where}.function.parameters", "parameters must be a JSON schema")
        described = {"name": name, "parameters": parameters}
        if isinstance(function.get("description"), str):
            described["description"] = function["description"]
        out.append({"type": "function", "function": described})
    return out


def _chosen(choice: Any) -> str:
    """The function a named ``tool_choice`` (or ``function_call``) names."""
    if isinstance(choice, dict):
        function = choice.get("function", choice)  # function_call is {"name": …}
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    raise BadParameter(
        "tool_choice",
        'tool_choice must be "none", "auto", "required" or {"type": "function", '
        '"function": {"name": …}}',
    )


def _forced(tools: list[tuple[int, dict[str, Any]]]) -> str:
    """The grammar of one call of one of ``tools`` (with their places in the request), its
    arguments as the tool's parameters say."""
    options = []
    for i, tool in tools:
        function = tool["function"]
        problem = grammar.unsupported(function["parameters"], "")
        if problem:
            where = f"tools[{i}].function.parameters"
            raise BadParameter(where, f"{where} cannot be enforced: {problem}")
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": function["parameters"] or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    try:
        return grammar.from_schema(schema, "tools")
    except InvalidRequest as exc:
        raise BadParameter("tools", exc.message) from None


# ------------------------------------------------------------------ the answer


def split_calls(text: str, names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The content and the calls of a whole answer (no calls: the text is all content)."""
    blocks = list(BLOCK.finditer(text))
    calls = [c for c in (_call(b.group(1), names) for b in blocks) if c is not None]
    if calls:
        content = text[: blocks[0].start()].strip()
        return content, calls
    bare = _call(text, names)
    return ("", [bare]) if bare is not None else (text, [])


def _call(text: str, names: set[str]) -> dict[str, Any] | None:
    """One call in OpenAI's shape, if ``text`` is a JSON object naming an offered tool."""
    try:
        found = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(found, dict) or found.get("name") not in names:
        return None
    arguments = found.get("arguments", found.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _object_or_text(arguments)
    return {
        "id": "call_" + secrets.token_hex(12),
        "type": "function",
        "function": {"name": found["name"], "arguments": json.dumps(arguments)},
    }


def _object_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolStream:
    """Streamed text with calls held back: ``feed`` gives what can go out as content now,
    ``end`` the rest of the content and the calls."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.text = ""  # the whole answer so far
        self.sent = 0  # how much of it went out as content

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.sent == 0 and _maybe_bare_call(self.text):
            return ""
        pending = self.text[self.sent :]
        start = pending.find(OPEN)  # from a call's opening tag on, everything is held
        out = pending[: start if start >= 0 else len(pending) - _open_prefix(pending)]
        self.sent += len(out)
        return out

    def end(self) -> tuple[str, list[dict[str, Any]]]:
        """What was held: content still to send, and the calls."""
        return split_calls(self.text[self.sent :], self.names)


def _maybe_bare_call(text: str) -> bool:
    stripped = text.lstrip()
    return stripped == "" or stripped.startswith("{")


def _open_prefix(text: str) -> int:
    """How many characters at the end of ``text`` could begin ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
