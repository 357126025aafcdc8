"""rbee's error codes at the HTTP edge: a status, an OpenAI error type and, when waiting helps,
a Retry-After header.

OpenAI clients decide on the status (the official one retries 429 and 5xx, honouring
Retry-After), so busy and draining hives get statuses that make clients back off and try again,
while rbee's own code travels in the body's ``code`` for people and scripts that want detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from rbee.errors import InvalidRequest, RbeeError

INVALID = "invalid_request_error"
SERVER = "server_error"


class BadParameter(InvalidRequest):
    """A request field the gateway cannot honour; ``param`` names it for OpenAI's error body."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class HttpError:
    """How one rbee error code is answered over HTTP."""

    status: int
    type: str


STATUS_BY_CODE: dict[str, HttpError] = {
    "INVALID_REQUEST": HttpError(400, INVALID),
    "INVALID_MODEL": HttpError(400, INVALID),
    "MODEL_AMBIGUOUS": HttpError(400, INVALID),
    "MODEL_NOT_FOUND": HttpError(404, INVALID),
    "ACCESS_DENIED": HttpError(502, SERVER),  # a hive refused the gateway (401 is the client's)
    "HIVE_KEY_CHANGED": HttpError(502, SERVER),
    "VERSION_MISMATCH": HttpError(502, SERVER),
    "PROTOCOL_ERROR": HttpError(502, SERVER),
    "CHECKSUM_MISMATCH": HttpError(502, SERVER),
    "DOWNLOAD_FAILED": HttpError(502, SERVER),
    "ALL_SLOTS_BUSY": HttpError(429, "rate_limit_error"),
    "HIVE_DRAINING": HttpError(503, SERVER),
    "HIVE_UNREACHABLE": HttpError(503, SERVER),
    "HIVE_LOST": HttpError(503, SERVER),
    "JOB_STOPPED": HttpError(503, SERVER),  # the hive shut down or an admin stopped the job
    "INSUFFICIENT_RAM": HttpError(503, SERVER),
    "INSUFFICIENT_VRAM": HttpError(503, SERVER),
    "INSUFFICIENT_DISK": HttpError(503, SERVER),
    "BACKEND_UNAVAILABLE": HttpError(503, SERVER),
    "LOADING_TIMEOUT": HttpError(504, SERVER),
    "TIMEOUT": HttpError(504, SERVER),
    "CANCELED": HttpError(499, INVALID),  # nginx's "client closed request": seldom seen by anyone
}
FALLBACK = HttpError(500, SERVER)  # WORKER_CRASHED, WORKER_START_FAILED, INTERNAL, unknown
RETRY_AFTER_CODES = (
    "ALL_SLOTS_BUSY",
    "HIVE_DRAINING",
    "HIVE_UNREACHABLE",
    "HIVE_LOST",
    "JOB_STOPPED",
)
DEFAULT_RETRY_AFTER_S = 1.0


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(exc: RbeeError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and headers answering ``exc``."""
    mapped = STATUS_BY_CODE.get(exc.code, FALLBACK)
    message = exc.message + (f" (hint: {exc.suggestion})" if exc.suggestion else "")
    param = "model" if exc.code == "MODEL_NOT_FOUND" else getattr(exc, "param", None)
    body = error_body(message, mapped.type, exc.code, param)
    headers = {}
    if exc.code in RETRY_AFTER_CODES:
        wait = exc.retry_after_s or DEFAULT_RETRY_AFTER_S
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return mapped.status, body, headers


def ollama_error(exc: RbeeError) -> JSONResponse:
    """An rbee error the way Ollama answers one: its status, ``{"error": message}``."""
    status, _, headers = http_error(exc)
    return JSONResponse({"error": exc.message}, status, headers)
