"""One keeper request as the hive's parts see it, and how they answer it.

The hive's loop reads a frame from its ROUTER socket, works out who sent it (the connection's
identity, the request id every reply carries, the CURVE key and that key's role) and hands the
parts a ``Request``: nothing about the caller lives on the hive between requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rbee.errors import AccessDenied, RbeeError
from rbee.protocol.messages import Frame
from rbee.transport.keys import fingerprint
from rbee.transport.sockets import RouterServer

Role = Literal["admin", "infer", "hive"]  # hive: a peer hive (inference, and borrowing memory)


@dataclass(frozen=True)
class Request:
    """Who asked, and with what rights."""

    who: bytes  # the ROUTER identity of the keeper's connection
    rid: int  # the request id: every reply to it carries it
    role: Role
    key: str = ""  # the caller's CURVE public key ("" on a development-mode hive)

    @property
    def admin(self) -> bool:
        """Whether the caller holds the admin role."""
        return self.role == "admin"

    def require_admin(self, what: str) -> None:
        """AccessDenied unless the caller is an admin."""
        if not self.admin:
            raise AccessDenied(
                f"{what} needs the admin role; this keeper's key has the {self.role} role",
                suggestion="on the hive: `rbee hive authorize KEY --role admin`",
            )

    def describe(self) -> str:
        """The caller as a person reads it in a message to someone else."""
        return f"an admin key ({fingerprint(self.key)})" if self.key else "a keeper"


class Replies:
    """The hive's answers on its front socket (loop thread only)."""

    def __init__(self, front: RouterServer) -> None:
        self.front = front

    def send(self, request: Request, frame: Frame) -> None:
        """One reply frame (a request may get several: progress, then its answer)."""
        self.front.send(request.who, frame, request.rid)

    def error(self, request: Request, exc: RbeeError) -> None:
        """The request's final answer: an Error frame."""
        self.front.reply_error(request.who, request.rid, exc)
