"""What a chat template is given: the conversation as Hugging Face templates read it, and the
tools a request offers.

Templates that support tools (Qwen, Hermes, Llama 3.1, Mistral …) loop over ``tools`` and render
an assistant turn's ``tool_calls`` and the ``tool`` turns that answer them. They read a call's
``arguments`` as an object (``| tojson``), where OpenAI's wire format has a JSON string, so the
string is parsed back here, as llama-server does. A template that never mentions ``tools``
would drop them silently: such a request is refused instead.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rbee.errors import InvalidRequest
from rbee.protocol.messages import ChatMessage, GenerateParams

MENTIONS_TOOLS = re.compile(r"\btools\b")


def supports_tools(template: str) -> bool:
    """Whether a chat template renders the tools it is given."""
    return bool(MENTIONS_TOOLS.search(template))


def template_input(params: GenerateParams, template: str) -> dict[str, Any]:
    """The keyword arguments of the template: ``messages`` and, when offered, ``tools``."""
    messages = [_message(m) for m in params.messages] or [
        {"role": "user", "content": params.prompt}
    ]
    if not params.tools:
        return {"messages": messages}
    if not supports_tools(template):
        raise InvalidRequest(
            "this model's chat template does not support tools",
            suggestion="leave tools out, or use a model whose template renders them "
            "(`rbee models show NAME` says whether it mentions tools)",
        )
    return {"messages": messages, "tools": json.loads(params.tools)}


def _message(m: ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        calls = json.loads(m.tool_calls)
        for call in calls:
            function = call.get("function", {})
            function["arguments"] = _object(function.get("arguments", "{}"))
        message["tool_calls"] = calls
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def _object(arguments: Any) -> Any:
    """A call's arguments as the template reads them: the JSON string parsed, else as given."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
