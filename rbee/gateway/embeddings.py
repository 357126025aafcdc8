"""Embeddings: OpenAI's ``/v1/embeddings`` and Ollama's ``/api/embed`` and ``/api/embeddings``,
each one embedding job (rbee.worker.embedding) on a worker of the model.

The worker returns each input's raw vector; here they are shaped as each API gives them:
OpenAI's and ``/api/embed`` unit length (as both services return them, so a dot product is the
cosine), ``/api/embeddings`` (Ollama's older endpoint) as the model made it. ``dimensions``
keeps the first N components and normalizes again, as Ollama does for models trained to be cut
(Matryoshka). OpenAI's client asks for base64 unless told otherwise: little-endian float32.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request

from rbee.gateway.errors import BadParameter
from rbee.gateway.http import collect
from rbee.gateway.jobs import Job
from rbee.gateway.params import model_name
from rbee.keeper.job import Failed
from rbee.protocol.messages import MAX_EMBED_INPUTS, MAX_PROMPT_CHARS, Done, GenerateParams

if TYPE_CHECKING:
    from rbee.gateway.app import Gateway


@dataclass(frozen=True)
class EmbedCall:
    """A validated embedding request."""

    model: str
    inputs: list[str]
    truncate: bool = True
    dimensions: int | None = None  # keep this many components (then normalize)

    def params(self) -> GenerateParams:
        return GenerateParams(prompt="", inputs=self.inputs, truncate=self.truncate)


@dataclass(frozen=True)
class Embedded:
    """What the job gave: one vector per input, and the tokens it read."""

    vectors: list[np.ndarray]
    done: Done


def parse(body: Any, *, allow_local_models: bool, field: str = "input") -> EmbedCall:
    """An OpenAI or Ollama embedding body: ``model``, the texts (``field``: one string or a
    list of them), Ollama's ``truncate`` and both APIs' ``dimensions``."""
    model = model_name(body, allow_local_models)
    given = body.get(field)
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        hint = " (token ids are not supported)" if isinstance(texts, list) else ""
        raise BadParameter(field, f"{field} must be a string or a list of strings{hint}")
    if len(texts) > MAX_EMBED_INPUTS:
        raise BadParameter(field, f"{field} holds {len(texts)} texts; at most {MAX_EMBED_INPUTS}")
    if sum(map(len, texts)) > MAX_PROMPT_CHARS:
        raise BadParameter(field, f"{field} exceeds {MAX_PROMPT_CHARS} characters in all")
    if any(not t for t in texts):
        raise BadParameter(field, f"{field} holds an empty string")
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise BadParameter("truncate", "truncate must be true or false")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise BadParameter("dimensions", "dimensions must be a positive integer")
    return EmbedCall(model, texts, truncate, dimensions)


async def embed(
    gateway: Gateway, request: Request, call: EmbedCall, keep_alive_s: float | None = None
) -> Embedded | Failed:
    """Run ``call`` as a job of ``gateway`` and wait for its vectors (both APIs' routes); the
    job is stopped if the wait ends otherwise (the server stopping). RbeeError when the job
    cannot start."""
    job = gateway.start(call.model, call.params(), keep_alive_s)
    try:
        return await _vectors(request, job, call, gateway.config.keepalive_s)
    except BaseException:
        job.cancel()
        raise


async def _vectors(
    request: Request, job: Job, call: EmbedCall, keepalive_s: float
) -> Embedded | Failed:
    """Wait for the job's vectors (cut to ``dimensions``; a client that hangs up cancels it)."""
    _, end = await collect(request, job, keepalive_s)
    if isinstance(end, Failed):
        return end
    vectors = [np.frombuffer(v, dtype="<f4") for v in end.done.vectors]
    if call.dimensions is not None:
        width = len(vectors[0]) if vectors else 0
        if call.dimensions > width:
            return Failed(
                BadParameter(
                    "dimensions",
                    f"dimensions is {call.dimensions}; {call.model} makes vectors of {width}",
                )
            )
        vectors = [normalized(v[: call.dimensions]) for v in vectors]
    return Embedded(vectors, end.done)


def normalized(vector: np.ndarray) -> np.ndarray:
    """``vector`` at unit length (a zero vector stays zero)."""
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def openai_response(call: EmbedCall, embedded: Embedded, encoding: str) -> dict[str, Any]:
    """OpenAI's list of embedding objects."""

    def encoded(vector: np.ndarray) -> Any:
        unit = normalized(vector).astype("<f4")
        return base64.b64encode(unit.tobytes()).decode() if encoding == "base64" else unit.tolist()

    tokens = embedded.done.prompt_tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(v)}
            for i, v in enumerate(embedded.vectors)
        ],
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def encoding_format(body: dict[str, Any]) -> str:
    """OpenAI's ``encoding_format``: float (the default) or base64."""
    value = body.get("encoding_format") or "float"
    if value not in ("float", "base64"):
        raise BadParameter("encoding_format", "encoding_format must be float or base64")
    return str(value)
