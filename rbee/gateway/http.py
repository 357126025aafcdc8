"""Reading a request, watching its client and waiting on its job: what the OpenAI and the
Ollama routes of the gateway both need."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from rbee.gateway.errors import BadParameter
from rbee.gateway.jobs import Job
from rbee.keeper.job import Failed, Finished, Started, Text
from rbee.protocol.messages import TokenProb

NDJSON = "application/x-ndjson"  # Ollama's streams: one JSON object a line
MAX_BODY_BYTES = 8 * 1024 * 1024  # a whole prompt fits (1 MiB of text, JSON-escaped)


async def read_json(request: Request) -> Any:
    """The body as JSON, read with a size cap."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise BadParameter(None, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadParameter(None, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise BadParameter(None, "the request body nests JSON too deeply") from None


def ndjson_line(obj: dict[str, Any]) -> bytes:
    """One line of an Ollama stream."""
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def cancel_on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    """Call ``cancel`` once the client hangs up."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()


async def collect(
    request: Request, job: Job, keepalive_s: float, probs: list[TokenProb] | None = None
) -> tuple[str, Finished | Failed]:
    """A whole answer's text and how the job ended (its tokens' log probabilities added to
    ``probs``); a client that hangs up meanwhile cancels the job."""
    watcher = asyncio.ensure_future(cancel_on_disconnect(request, job.cancel))
    pieces: list[str] = []
    try:
        while True:
            event = await job.next(keepalive_s)
            if isinstance(event, Text):
                pieces.append(event.text)
                if probs is not None:
                    probs.extend(event.probs)
            elif isinstance(event, Finished | Failed):
                return "".join(pieces), event
    finally:
        watcher.cancel()


async def opening(job: Job, keepalive_s: float) -> list[Text | Started] | Failed:
    """Wait (up to one keep-alive interval) for a streamed job to start or fail, so a job that
    fails first is answered with an HTTP error, not with a stream: its first events, or Failed.
    (A Finished event cannot come before Started; Waiting and Progress say it is coming.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + keepalive_s
    first: list[Text | Started] = []
    while not first and (left := deadline - loop.time()) > 0:
        event = await job.next(left)
        if event is None:
            break
        if isinstance(event, Failed):
            return event
        if isinstance(event, Text | Started):
            first.append(event)
    return first
