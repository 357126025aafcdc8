"""Ollama's ``logprobs`` and ``top_logprobs`` (Ollama 0.12.11's API) on /api/chat and
/api/generate: what a request asks for, and the ``logprobs`` list its answer carries.

The numbers are the ones the OpenAI routes give (rbee.gateway.shapes): the worker's log
probability of each generated token under the model's own distribution, with the likeliest
tokens at its place, most likely first. Ollama's shape is OpenAI chat's ``content`` list
without the wrapper: ``{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``, its
empty fields left out as Go's ``omitempty`` leaves them out. A streamed line carries its own
tokens' entries; a whole answer carries all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rbee.gateway.errors import BadParameter
from rbee.gateway.shapes import token_entry
from rbee.protocol.messages import MAX_TOP_LOGPROBS, TokenProb


def requested(body: dict[str, Any]) -> int:
    """How many alternatives each token's entry lists (GenerateParams.logprobs; -1: no
    logprobs). ``top_logprobs`` out of 0-20 is a 400, as Ollama's; without ``logprobs: true``
    it asks for nothing, as in Ollama."""
    top = body.get("top_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        raise BadParameter("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    asked = body.get("logprobs")
    if asked is None:
        return -1
    if not isinstance(asked, bool):
        raise BadParameter("logprobs", "logprobs must be true or false")
    return (top or 0) if asked else -1


def entries(probs: Sequence[TokenProb]) -> list[dict[str, Any]]:
    """Ollama's ``logprobs`` list for these tokens."""
    out = []
    for p in probs:
        entry = token_entry(p, top=True)
        if not entry["top_logprobs"]:
            del entry["top_logprobs"]
        out.append(entry)
    return out
