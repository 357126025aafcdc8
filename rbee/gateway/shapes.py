"""Answers in OpenAI's shape: whole responses, stream chunks as server-sent events, and the
keep-alive comment and end marker, byte for byte as the OpenAI API sends them.

Streams are ``data: {json}\\n\\n`` events ending with ``data: [DONE]\\n\\n``. A chat stream opens
with a chunk whose delta carries the role; every stream closes with a chunk carrying the
finish_reason, then (``stream_options.include_usage``) a chunk with empty choices and the usage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rbee.gateway.params import Kind
from rbee.protocol.messages import Alternative, Done, TokenProb

DONE_EVENT = b"data: [DONE]\n\n"
KEEP_ALIVE_EVENT = b": keep-alive\n\n"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "canceled": "stop"}


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON payload."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))  # compact, as OpenAI's
    return b"data: " + text.encode() + b"\n\n"


def usage(done: Done) -> dict[str, int]:
    """OpenAI's usage object: the worker's own token counts."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.tokens,
        "total_tokens": done.prompt_tokens + done.tokens,
    }


@dataclass
class Shaper:
    """Builds every piece of one response, sharing its id, creation time and model name."""

    kind: Kind
    model: str
    response_id: str
    include_usage: bool = False
    logprobs: bool = False  # asked for: every choice carries a logprobs object
    created: int = field(default_factory=lambda: int(time.time()))
    offset: int = 0  # characters of completion text so far (its logprobs' text_offset)

    # ------------------------------------------------------------------ whole responses

    def response(
        self,
        text: str,
        done: Done,
        where: dict[str, str],
        calls: list[dict[str, Any]] | None = None,
        probs: Sequence[TokenProb] = (),
    ) -> dict[str, Any]:
        """A non-streaming answer; ``where`` (node, worker, job) goes in an ``rbee`` field;
        ``calls``: the tool calls read from the text (rbee.gateway.tools); ``probs``: every
        token's log probability, when asked for."""
        reason = "tool_calls" if calls else FINISH_REASONS[done.stop_reason]
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message.update(content=text or None, tool_calls=calls)
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": self._logprobs(probs),
                "finish_reason": reason,
            }
            obj = "chat.completion"
        else:
            logprobs = self._logprobs(probs)
            choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}
            obj = "text_completion"
        return {
            **self._head(obj),
            "choices": [choice],
            "usage": usage(done),
            "rbee": where,
        }

    # ------------------------------------------------------------------ stream events

    def opening(self) -> bytes:
        """The first event: a chat announces the assistant's role; a completion says nothing."""
        if self.kind != "chat":
            return b""
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str, probs: Sequence[TokenProb] = ()) -> bytes:
        """An event adding ``text`` (and its tokens' log probabilities)."""
        if self.kind == "chat":
            return self._chunk({"content": text}, None, probs)
        return self._chunk(text, None, probs)

    def calls(self, calls: list[dict[str, Any]]) -> bytes:
        """An event carrying tool calls, each whole, with its index."""
        return self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}, None)

    def closing(
        self, done: Done, called: bool = False, rbee: dict[str, Any] | None = None
    ) -> bytes:
        """The finish_reason event (with ``rbee``'s fields, such as the receipt, under
        ``rbee``), the usage event if asked for, and the end marker."""
        reason = "tool_calls" if called else FINISH_REASONS[done.stop_reason]
        last = self._chunk({} if self.kind == "chat" else "", reason, extra=rbee)
        if self.include_usage:
            last += sse({**self._head(self._chunk_object), "choices": [], "usage": usage(done)})
        return last + DONE_EVENT

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _chunk(
        self,
        delta: dict[str, Any] | str,
        reason: str | None,
        probs: Sequence[TokenProb] = (),
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        if isinstance(delta, dict):
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"text": delta, "index": 0}
        choice.update(logprobs=self._logprobs(probs) if probs else None, finish_reason=reason)
        payload = {**self._head(self._chunk_object), "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        if extra:
            payload["rbee"] = extra
        return sse(payload)

    def _logprobs(self, probs: Sequence[TokenProb]) -> dict[str, Any] | None:
        """OpenAI's logprobs object: chat's ``content`` list, or completions' parallel lists."""
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return {"content": [token_entry(p, top=True) for p in probs], "refusal": None}
        offsets = []
        for p in probs:
            offsets.append(self.offset)
            self.offset += len(_text(p.piece))
        return {
            "tokens": [_text(p.piece) for p in probs],
            "token_logprobs": [p.logprob for p in probs],
            "top_logprobs": [{_text(a.piece): a.logprob for a in p.top} for p in probs],
            "text_offset": offsets,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def token_entry(p: TokenProb | Alternative, top: bool = False) -> dict[str, Any]:
    """One token of chat's logprobs: its text, log probability and bytes (a token may hold
    part of a character), with the alternatives at its place."""
    entry: dict[str, Any] = {"token": _text(p.piece), "logprob": p.logprob, "bytes": list(p.piece)}
    if top and isinstance(p, TokenProb):
        entry["top_logprobs"] = [token_entry(a) for a in p.top]
    return entry
