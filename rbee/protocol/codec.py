"""The one msgpack codec: a frame becomes ``{"v": version, "t": type, "r": request id, "b": body}``.

Decoding checks size, shape, version and type, then builds the frame class (which validates every
field) before any code acts on it. Anything wrong raises ProtocolError, VersionMismatch or
InvalidRequest; callers reply with an Error frame or drop and count, never crash.

What decoding may build is bounded (``Bounds``), not just the frame's size: msgpack turns one
byte into an empty list (~60 bytes), so a frame of nothing but containers would grow 70-fold.
Frames from whoever may send them unauthenticated or with any key (keepers' requests, pairing)
are held to the few containers a real request has; frames from the hive's own workers and from
a hive whose key is pinned get room for the largest real replies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from rbee.errors import InvalidRequest, ProtocolError, VersionMismatch
from rbee.protocol.messages import (
    FRAME_TYPES,
    MAX_CHAT_MESSAGES,
    MAX_TOKENS_LIMIT,
    PROTOCOL_VERSION,
    Frame,
    Token,
)
from rbee.protocol.schema import record_from_wire

MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_REQUEST_BYTES = 8 * 1024 * 1024  # 2 Mi characters of prompt and messages, UTF-8
MAX_PAIRING_BYTES = 4096


@dataclass(frozen=True)
class Bounds:
    """What decoding one frame may build: its size, each container's length and (when
    ``containers`` > 0) how many maps and arrays in all."""

    frame_bytes: int
    array_len: int
    map_len: int = 64  # the widest frame has ~16 fields
    containers: int = 0


REPLIES = Bounds(MAX_FRAME_BYTES, array_len=MAX_TOKENS_LIMIT + 1)  # workers, pinned hives
REQUESTS = Bounds(MAX_REQUEST_BYTES, MAX_CHAT_MESSAGES, 32, MAX_CHAT_MESSAGES + 16)  # keepers
PAIRING = Bounds(MAX_PAIRING_BYTES, array_len=4, map_len=16, containers=8)  # anyone on the LAN


class Envelope(NamedTuple):
    """A decoded frame and the request id it answers or carries (0: none). A tuple: one is
    made for every frame of every stream, and a frozen dataclass costs ~1 µs more to build."""

    frame: Frame
    rid: int


def encode(frame: Frame, rid: int = 0) -> bytes:
    """Serialize a frame (already valid: frames validate when built)."""
    body = frame.to_wire()
    data: bytes = msgpack.packb({"v": PROTOCOL_VERSION, "t": frame.TYPE, "r": rid, "b": body})
    return data


def decode(data: bytes, bounds: Bounds = REPLIES) -> Envelope:
    """Parse and validate one frame; raise an rbee error for anything malformed or beyond
    ``bounds`` (before it is built: the bounds are checked as msgpack reads)."""
    if len(data) > bounds.frame_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {bounds.frame_bytes}")
    hooks: dict[str, Any] = {}
    if bounds.containers:
        hooks["object_hook"] = hooks["list_hook"] = _Budget(bounds.containers)
    try:
        raw: Any = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_array_len=bounds.array_len,
            max_map_len=bounds.map_len,
            max_ext_len=0,
            **hooks,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError("frame must be a map")
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks protocol version {version!r}, this rbee speaks {PROTOCOL_VERSION}",
            suggestion="run the same rbee version on every machine",
        )
    type_name = raw.get("t")
    cls = FRAME_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown frame type {type_name!r:.40}")
    rid = raw.get("r", 0)
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ProtocolError("request id must be a non-negative integer")
    if cls is Token:
        token = _plain_token(raw.get("b"))
        if token is not None:
            return Envelope(frame=token, rid=rid)
    try:
        frame = record_from_wire(cls, raw.get("b", {}))
    except InvalidRequest:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {type_name} frame: {exc}") from None
    return Envelope(frame=frame, rid=rid)


class _Budget:
    """Counts the containers msgpack builds and stops it past the budget (msgpack calls the
    hooks as each map or array is finished, so nothing much is built beyond it)."""

    def __init__(self, containers: int) -> None:
        self.left = containers

    def __call__(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many maps and arrays")
        return container


_TOKEN_LIMITS = {f.name: f.metadata["limits"] for f in dataclasses.fields(Token)}


def _plain_token(body: Any) -> Token | None:
    """A Token checked field by field against its declared limits, without the generic record
    machinery: every frame of every stream passes here (~2 µs instead of ~14). None for
    anything unusual, which then takes the generic path and its precise error."""
    if type(body) is not dict or body.get("probs"):  # log probabilities: the checked path
        return None
    job_id, seq, text = body.get("job_id"), body.get("seq"), body.get("text")
    token_id, count = body.get("token_id", -1), body.get("count", 1)
    limits = _TOKEN_LIMITS
    if not (
        type(job_id) is str
        and len(job_id) <= limits["job_id"].max_len
        and limits["job_id"].pattern.fullmatch(job_id)
        and type(seq) is int
        and seq >= limits["seq"].min
        and type(text) is str
        and len(text) <= limits["text"].max_len
        and type(token_id) is int
        and token_id >= limits["token_id"].min
        and type(count) is int
        and limits["count"].min <= count <= limits["count"].max
    ):
        return None
    token = object.__new__(Token)  # every field checked above, as Token's own checks would
    fields = (("job_id", job_id), ("seq", seq), ("text", text), ("token_id", token_id))
    for name, value in (*fields, ("count", count), ("probs", [])):
        object.__setattr__(token, name, value)
    return token


def decode_as(data: bytes, cls: type[Frame]) -> Frame:
    """Decode a frame that must be of type ``cls`` (e.g. one stored stream frame)."""
    env = decode(data)
    if not isinstance(env.frame, cls):
        raise ProtocolError(f"expected a {cls.TYPE} frame, got {env.frame.TYPE}")
    return env.frame
