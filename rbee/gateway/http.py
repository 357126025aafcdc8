"""Reading a request and watching its client: what every route of the gateway needs."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from rbee.gateway.jobs import Job
from rbee.gateway.params import BadParameter

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


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
