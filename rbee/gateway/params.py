"""An OpenAI request body → a ``Call``: what to generate and how to answer, validated up front.

Everything a worker can honour maps onto GenerateParams (``response_format`` becomes a
grammar: rbee.grammar; ``tools`` go to the chat template: rbee.gateway.tools); what it cannot
(several choices, penalties, logit bias …) is refused with a 400 naming the parameter, as the
OpenAI API refuses values it does not support, so a client never gets silently different
behaviour. Fields that change nothing about the output (``user``, ``metadata``, ``store`` …)
are ignored. Extensions that llama.cpp's server accepts too: ``top_k``, ``ignore_eos`` (vLLM's
as well), ``cache_prompt`` (false: compute the whole prompt even where a slot holds its
prefix), ``json_schema`` and ``grammar``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from rbee import grammar
from rbee.errors import InvalidRequest
from rbee.gateway.errors import BadParameter
from rbee.gateway.tools import Tools, parse_tools
from rbee.protocol.messages import (
    FILE_PREFIX,
    MAX_GRAMMAR_CHARS,
    MAX_PROMPT_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    MAX_TOP_LOGPROBS,
    SYNTHETIC_PREFIX,
    ChatMessage,
    GenerateParams,
)

COMPLETION_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS_DEFAULT = MAX_TOKENS_LIMIT  # OpenAI's chat has none: generate to the context's end
TEMPERATURE_MAX = 2.0  # OpenAI's range; GenerateParams would take up to 5
SEED_MAX = 2**32 - 1
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # the deprecated function-calling answer
}

Kind = Literal["chat", "completion"]
COMPLETION_TOP_LOGPROBS = 5  # OpenAI's limit for /v1/completions


@dataclass(frozen=True)
class Turn:
    """One message of a chat, as the protocol's ChatMessage will carry it."""

    role: str  # system | user | assistant | tool
    content: str
    tool_calls: str = ""  # an assistant turn's calls (OpenAI's list, in JSON)
    tool_call_id: str = ""  # the call a tool turn answers


@dataclass(frozen=True)
class Call:
    """A validated request: the model, the generation, and the shape of the answer."""

    kind: Kind
    model: str
    params: GenerateParams
    stream: bool = False
    include_usage: bool = False
    tools: Tools | None = None  # offered to the model (its calls are read from the answer)


def parse_call(kind: Kind, body: Any, *, allow_local_models: bool) -> Call:
    """Validate a /v1/chat/completions or /v1/completions body; BadParameter names what's wrong.

    ``allow_local_models`` admits ``file:`` and ``synthetic:`` references: only a gateway bound
    to loopback may pass them on, so nobody on the network can make a hive open a path.
    """
    model = model_name(body, allow_local_models)
    _refuse_unsupported(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise BadParameter("stream_options", "stream_options is only allowed when stream is true")
    if options is not None and not isinstance(options, dict):
        raise BadParameter("stream_options", "stream_options must be an object")
    include_usage = bool(options and _bool(options, "include_usage", "stream_options."))
    tools = parse_tools(body) if kind == "chat" else None
    if kind == "chat":
        prompt = chat_prompt(_turns(body.get("messages")))
        default_max = CHAT_MAX_TOKENS_DEFAULT
    else:
        prompt = {"prompt": _completion_prompt(body.get("prompt")), "raw": True}
        default_max = COMPLETION_MAX_TOKENS_DEFAULT
    constrained = _grammar(body)
    if tools and tools.forced and constrained:
        raise BadParameter("tool_choice", "a forced tool call and a response format conflict")
    params = GenerateParams(
        **prompt,
        max_tokens=_max_tokens(body, default_max),
        temperature=_number(body, "temperature", 1.0, 0.0, TEMPERATURE_MAX),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=int(_number(body, "top_k", 40, 0, 1000, integer=True)),
        seed=int(_number(body, "seed", -1, -1, SEED_MAX, integer=True)),
        stop=_stop(body.get("stop")),
        ignore_eos=_bool(body, "ignore_eos"),
        cache_prompt=_bool(body, "cache_prompt", default=True),
        grammar=tools.forced if tools and tools.forced else constrained,
        tools=tools.wire() if tools else "",
        logprobs=_logprobs(kind, body),
    )
    return Call(kind, model, params, stream, include_usage, tools)


def model_name(body: Any, allow_local_models: bool) -> str:
    """The body's ``model``, checked (every endpoint names one the same way)."""
    if not isinstance(body, dict):
        raise BadParameter(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadParameter("model", "model is required (a model name, see GET /v1/models)")
    if model.startswith((FILE_PREFIX, SYNTHETIC_PREFIX)) and not allow_local_models:
        raise BadParameter("model", f"{model.split(':')[0]}: models are served on loopback only")
    return model


def chat_prompt(turns: list[Turn]) -> dict[str, Any]:
    """The GenerateParams fields that carry a conversation to the worker's chat template:
    the turns themselves, and a flattened prompt for models without a template."""
    return {
        "prompt": flatten(turns),
        "messages": [
            ChatMessage(
                role=t.role, content=t.content, tool_calls=t.tool_calls, tool_call_id=t.tool_call_id
            )
            for t in turns
        ],
    }


def flatten(turns: list[Turn]) -> str:
    """One prompt standing for a conversation: the lone user message, else labelled turns."""
    if len(turns) == 1 and turns[0].role == "user":
        return turns[0].content
    return "\n\n".join(f"{t.role.capitalize()}: {t.content}" for t in turns)


# ------------------------------------------------------------------ parameters refused


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Both endpoints refuse one set: a field of the other endpoint is refused the same way."""
    n = body.get("n")
    if n is not None and n != 1:
        raise BadParameter("n", f"n must be 1: rbee generates one choice per request (got {n!r})")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise BadParameter("best_of", "best_of must be 1: rbee generates one choice per request")
    refused = {
        "logit_bias": "logit_bias is not supported",
        "echo": "echo is not supported",
        "suffix": "suffix is not supported",
        "audio": "audio output is not supported",
        "prediction": "predicted outputs are not supported",
    }
    for name, why in refused.items():
        if body.get(name) not in (None, False, "", [], {}):
            raise BadParameter(name, why)
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise BadParameter("modalities", "only text output is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name, 0.0, -2.0, 2.0)
        if value != 0:
            raise BadParameter(name, f"{name} is not supported (only 0)")


def _logprobs(kind: Kind, body: dict[str, Any]) -> int:
    """How many alternatives to report with each token's log probability (-1: none). Chat has
    ``logprobs`` (true/false) and ``top_logprobs`` (0-20); completions ``logprobs`` (0-5)."""
    if kind == "completion":
        if body.get("logprobs") is None:
            return -1
        return int(_number(body, "logprobs", 0, 0, COMPLETION_TOP_LOGPROBS, integer=True))
    top = body.get("top_logprobs")
    if not _bool(body, "logprobs"):
        if top is not None:
            raise BadParameter("top_logprobs", "top_logprobs needs logprobs: true")
        return -1
    return int(_number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True))


# ------------------------------------------------------------------ structured output


def _grammar(body: dict[str, Any]) -> str:
    """The grammar the output must follow: OpenAI's ``response_format`` (``json_object``, or
    ``json_schema`` with its ``schema``), or llama-server's extensions ``json_schema`` (a schema)
    and ``grammar`` (GBNF); "" for free text."""
    given = [n for n in ("response_format", "json_schema", "grammar") if body.get(n) is not None]
    if len(given) > 1:
        raise BadParameter(given[1], f"give one of {' and '.join(given)}, not both")
    if body.get("grammar") is not None:
        text = body["grammar"]
        if not isinstance(text, str) or len(text) > MAX_GRAMMAR_CHARS:
            raise BadParameter("grammar", f"grammar must be GBNF text (≤ {MAX_GRAMMAR_CHARS})")
        return text
    if body.get("json_schema") is not None:
        return _from_schema(body["json_schema"], "json_schema")
    fmt = body.get("response_format")
    if fmt is None:
        return ""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return ""
    if kind == "json_object":  # llama-server also reads a "schema" here
        schema = fmt.get("schema")
        if schema is None:
            return grammar.any_json_object()
        return _from_schema(schema, "response_format.schema")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise BadParameter(
                "response_format.json_schema", "response_format.json_schema must be an object"
            )
        schema = spec.get("schema")
        if schema is None:
            return grammar.any_json_object()
        return _from_schema(schema, "response_format.json_schema.schema")
    raise BadParameter(
        "response_format.type", "response_format.type must be text, json_object or json_schema"
    )


def _from_schema(schema: Any, where: str) -> str:
    try:
        return grammar.from_schema(schema, where)
    except InvalidRequest as exc:
        raise BadParameter(where, exc.message) from None


# ------------------------------------------------------------------ prompt


def _turns(messages: Any) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise BadParameter("messages", "messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadParameter(where, f"{where} must be an object")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadParameter(
                f"{where}.role",
                f"{where}.role must be system, developer, user, assistant or tool (got {role!r})",
            )
        content = _content(m.get("content"), f"{where}.content")
        calls = _tool_calls(m, where) if role == "assistant" else ""
        answers = m.get("tool_call_id", m.get("name", "")) if ROLES[role] == "tool" else ""
        if not isinstance(answers, str):
            raise BadParameter(f"{where}.tool_call_id", f"{where}.tool_call_id must be a string")
        turns.append(Turn(ROLES[role], content, calls, answers[:256]))
    if sum(len(t.content) + len(t.tool_calls) for t in turns) > MAX_PROMPT_CHARS:
        raise BadParameter("messages", f"the messages exceed {MAX_PROMPT_CHARS} characters")
    return turns


def _tool_calls(message: dict[str, Any], where: str) -> str:
    """An assistant turn's earlier calls, checked and carried as JSON ("" for none)."""
    calls = message.get("tool_calls")
    if calls is None and isinstance(message.get("function_call"), dict):
        calls = [{"id": "", "type": "function", "function": message["function_call"]}]
    if calls in (None, []):
        return ""
    if not isinstance(calls, list):
        raise BadParameter(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str | dict):
            raise BadParameter(
                f"{where}.tool_calls[{i}]",
                f"{where}.tool_calls[{i}] needs function.name and function.arguments",
            )
        if isinstance(arguments, dict):  # Ollama writes them as an object
            arguments = json.dumps(arguments)
        call_id = call.get("id", "") if isinstance(call, dict) else ""
        out.append(
            {
                "id": call_id if isinstance(call_id, str) else "",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return json.dumps(out)


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (other parts are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadParameter(where, f"{where} must be a string or a list of text parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadParameter(where, f"{where}: only text parts are supported (got {kind!r})")
        text = part.get("text")
        if not isinstance(text, str):
            raise BadParameter(where, f"{where}: a text part needs a text string")
        texts.append(text)
    return "".join(texts)


def _completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise BadParameter(
            "prompt", "prompt must be one string (batches and token arrays are not supported)"
        )
    if not isinstance(prompt, str) or not prompt:
        raise BadParameter("prompt", "prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadParameter("prompt", f"prompt exceeds {MAX_PROMPT_CHARS} characters")
    return prompt


# ------------------------------------------------------------------ sampling


def _max_tokens(body: dict[str, Any], default: int) -> int:
    newer = body.get("max_completion_tokens") is not None  # OpenAI's newer name wins
    name = "max_completion_tokens" if newer else "max_tokens"
    return int(_number(body, name, default, 1, MAX_TOKENS_LIMIT, integer=True))


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise BadParameter(name, f"{name} must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise BadParameter(name, f"{name} must be between {_num(low)} and {_num(high)}")
    return float(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bool(body: dict[str, Any], name: str, prefix: str = "", default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadParameter(prefix + name, f"{prefix}{name} must be true or false")
    return value


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadParameter("stop", "stop must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise BadParameter("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
    return [s for s in items if s]
