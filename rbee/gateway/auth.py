"""Who may use the gateway: anyone on this machine when it listens on loopback alone; otherwise
only clients presenting one of the API keys as ``Authorization: Bearer KEY``.

Keys come from a file readable by its owner alone (``--api-keys-file``: one key a line, ``#``
comments) or from ``RBEE_API_KEYS`` (separated by commas or whitespace). A key is compared in
constant time, through fixed-length digests so not even its length leaks, and never logged or
echoed: a refused request is told only that its key was missing or wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from rbee.errors import AccessDenied, InvalidRequest
from rbee.gateway.errors import error_body

KEYS_ENV = "RBEE_API_KEYS"
OPEN_PATHS = ("/health",)  # liveness probes carry no key and learn nothing secret
MIN_KEY_CHARS = 16


def load_keys(keys_file: str | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The API keys from ``keys_file`` and ``RBEE_API_KEYS``; a file others may read is refused.

    Raises AccessDenied for a file readable or writable by group or others (whoever can read it
    can use the gateway), InvalidRequest for a missing file or a key too short to be secret.
    """
    env = os.environ if environ is None else environ
    keys: list[str] = env.get(KEYS_ENV, "").replace(",", " ").split()
    if keys_file:
        keys += _read_keys_file(Path(keys_file))
    for key in keys:
        if len(key) < MIN_KEY_CHARS:
            raise InvalidRequest(
                f"an API key has {len(key)} characters; at least {MIN_KEY_CHARS} are needed",
                suggestion="generate keys with e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`",
            )
    return tuple(dict.fromkeys(keys))


def _read_keys_file(path: Path) -> list[str]:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise InvalidRequest(f"cannot read the API keys file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AccessDenied(
            f"the API keys file {path} is open to group or others (mode {stat.S_IMODE(mode):04o})",
            suggestion=f"chmod 600 {path}",
        )
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """Whether ``token`` is one of ``keys``: every key is compared, each in constant time."""
    digest = hashlib.sha256(token.encode()).digest()
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return found


class BearerAuth:
    """ASGI middleware refusing requests without a valid key (when keys are configured).

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer and detach
    streaming responses from the client's disconnect.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an authorized request on; answer 401 in OpenAI's shape otherwise."""
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        what = "no API key was given" if not token else "the API key is not valid"
        body = error_body(
            f"{what}: send `Authorization: Bearer KEY` with a key of this gateway",
            "invalid_request_error",
            AccessDenied.code,
        )
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
