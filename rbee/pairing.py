"""Pairing a keeper with a hive using one short code, so nobody copies keys by hand.

`rbee hive pair` (on the hive's machine) prints a one-time code and listens on the pairing port
(the hive's port + 2) for a few minutes; `rbee pair NODE CODE` (on the keeper's machine) runs
SPAKE2 with it. Both sides derive the same key only if they used the same code; each then sends
its CURVE public key with a MAC under that key, so each side learns the other's key and knows it
came from whoever holds the code. A man in the middle sees only SPAKE2 messages, from which the
code cannot be recovered offline (that is SPAKE2's guarantee). Every field the hive sends back
is under the MAC, so a relay cannot change where the keeper will connect. Afterwards the hive
admits the keeper's key (authorized_keys, with the role chosen) and the keeper pins the hive's
key (known_hives).

Guessing online is bounded without handing anyone on the LAN a way to void the code: only a
completed exchange with a wrong code counts as a guess, a peer address gets MAX_FAILURES_PER_PEER
of them and is then ignored, and the code is void after MAX_FAILURES from all peers together (a
1 in 10^7 chance for a guesser). Each address may start one exchange per
HELLO_INTERVAL_S (SPAKE2 costs CPU), and at most MAX_PENDING exchanges wait for a confirmation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from spake2 import SPAKE2_A, SPAKE2_B

from rbee import log
from rbee.errors import AccessDenied, HiveUnreachable, InvalidRequest, RbeeError, Timeout
from rbee.protocol.codec import PAIRING
from rbee.protocol.messages import (
    PAIR_WINDOW_S,
    PairAccepted,
    PairConfirm,
    PairHello,
    PairHelloReply,
)
from rbee.transport.keys import AuthorizedKeys, KnownHive, KnownHives, fingerprint, load_or_create
from rbee.transport.sockets import DealerClient, RouterServer, bind_endpoint, new_socket

PAIR_PORT_OFFSET = 2
MAX_FAILURES = 10
MAX_FAILURES_PER_PEER = 3
MAX_PENDING = 16
HELLO_INTERVAL_S = 0.5
PAIRING_HWM = 16
STEP_TIMEOUT_S = 5.0
ID_KEEPER = b"rbee keeper"
ID_HIVE = b"rbee hive"

logger = log.get(__name__)


def new_code() -> str:
    """A one-time code people can read out: eight digits in two groups."""
    value = f"{secrets.randbelow(10**8):08d}"
    return f"{value[:4]}-{value[4:]}"


def check_code(code: str) -> str:
    """The code as `rbee hive pair` prints it (eight digits, a dash or space optional), checked
    before the keeper asks the network; InvalidRequest otherwise."""
    if not re.fullmatch(r"\d{4}[- ]?\d{4}", code.strip()):
        raise InvalidRequest(
            f"{code[:40]!r} is not a pairing code: it is eight digits, like 4821-0375",
            suggestion="copy the code `rbee hive pair` printed on the hive",
        )
    return code.strip()


def _secret(code: str) -> bytes:
    return "".join(c for c in code if c.isdigit()).encode()


def _mac(key: bytes, label: bytes, *parts: str) -> bytes:
    return hmac.new(key, label + b"\0" + "\0".join(parts).encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class HiveIdentity:
    """What the pairing hive tells the keeper about itself."""

    node: str
    node_id: str
    router_port: int


def _accepted_mac(key: bytes, accepted: PairAccepted) -> bytes:
    """The hive's MAC over every field of its answer."""
    fields = (accepted.key, accepted.node_id, accepted.node, accepted.role)
    return _mac(key, b"hive", *fields, str(accepted.router_port))


@dataclass
class _Peer:
    """What the pairing hive remembers of one address."""

    failures: int = 0
    last_hello: float = -HELLO_INTERVAL_S


class PairingDesk:
    """The pairing hive's side: exchanges in progress, guesses counted per peer address."""

    def __init__(self, code: str, role: str, hive: HiveIdentity, public: str) -> None:
        self.secret = _secret(code)
        self.role = role
        self.hive = hive
        self.public = public
        self.pending: dict[bytes, tuple[bytes, str]] = {}  # identity → shared key, peer
        self.peers: dict[str, _Peer] = {}
        self.failures = 0

    def hello(self, who: bytes, peer: str, msg: bytes, now: float) -> PairHelloReply:
        """Run our half of SPAKE2 for one PairHello from connection ``who`` at address ``peer``
        (refused: too soon, or a peer that guessed wrong too often)."""
        state = self.peers.setdefault(peer, _Peer())
        if state.failures >= MAX_FAILURES_PER_PEER:
            raise AccessDenied(f"{peer} sent {state.failures} wrong codes: it is ignored now")
        if now - state.last_hello < HELLO_INTERVAL_S:
            raise AccessDenied(
                "pairing attempts come too fast", retryable=True, retry_after_s=HELLO_INTERVAL_S
            )
        state.last_hello = now
        spake = SPAKE2_B(self.secret, idA=ID_KEEPER, idB=ID_HIVE)
        reply = spake.start()
        try:
            shared = spake.finish(msg)
        except Exception:  # no code went into it: not a guess
            raise AccessDenied("pairing failed: a malformed pairing message") from None
        self.pending.pop(who, None)  # kept until its confirmation; beyond MAX_PENDING, the oldest
        if len(self.pending) >= MAX_PENDING:
            del self.pending[next(iter(self.pending))]
        self.pending[who] = (shared, peer)
        return PairHelloReply(msg=reply)

    def confirm(self, who: bytes, frame: PairConfirm) -> PairAccepted:
        """Check the keeper's MAC: a wrong one is a guess, counted against its address."""
        if who not in self.pending:
            raise AccessDenied("pairing messages out of order")
        shared, peer = self.pending.pop(who)
        if not hmac.compare_digest(_mac(shared, b"keeper", frame.key), frame.mac):
            self.failures += 1
            self.peers.setdefault(peer, _Peer()).failures += 1
            logger.warning("pairing attempt with a wrong code", peer=peer, failures=self.failures)
            if self.failures >= MAX_FAILURES:
                raise CodeVoid(
                    f"{self.failures} wrong codes: this pairing code is void",
                    suggestion="run `rbee hive pair` again for a new code",
                )
            raise AccessDenied("wrong pairing code")
        accepted = PairAccepted(
            key=self.public,
            node_id=self.hive.node_id,
            node=self.hive.node,
            role=self.role,
            router_port=self.hive.router_port,
            mac=b"",
        )
        return dataclasses.replace(accepted, mac=_accepted_mac(shared, accepted))


class CodeVoid(AccessDenied):
    """Too many wrong codes in all: pairing stops."""


def serve_pairing(
    data_dir: Path,
    host: str,
    port: int,
    code: str,
    role: str,
    hive: HiveIdentity,
    window_s: float = PAIR_WINDOW_S,
) -> str:
    """Wait for one keeper to pair with ``code``; returns its public key (now authorized)."""
    keys = load_or_create(data_dir)
    desk = PairingDesk(code, role, hive, keys.public)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = new_socket(ctx, zmq.ROUTER, PAIRING)
    sock.setsockopt(zmq.RCVHWM, PAIRING_HWM)
    try:
        bind_endpoint(sock, host, port)
        server = RouterServer(sock, bounds=PAIRING, peers=True)
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            if not sock.poll(200):
                continue
            incoming = server.recv()
            if incoming is None:
                continue
            who, frame, rid = incoming.identity, incoming.envelope.frame, incoming.envelope.rid
            try:
                if isinstance(frame, PairHello):
                    server.send(
                        who, desk.hello(who, incoming.peer, frame.msg, time.monotonic()), rid
                    )
                elif isinstance(frame, PairConfirm):
                    accepted = desk.confirm(who, frame)
                    AuthorizedKeys(data_dir).authorize(frame.key, role, "paired")
                    server.send(who, accepted, rid)
                    logger.info("paired", key=fingerprint(frame.key), role=role)
                    time.sleep(0.2)  # let the reply leave before the socket closes
                    return frame.key
                else:
                    raise AccessDenied("pairing messages out of order")
            except CodeVoid as void:
                server.reply_error(who, rid, void)
                raise
            except AccessDenied as refused:
                server.reply_error(who, rid, refused)
        raise Timeout(
            f"nobody paired within {window_s:.0f} s", suggestion="run `rbee hive pair` again"
        )
    finally:
        sock.close(0)
        ctx.term()


def pair_with(data_dir: Path, host: str, pair_port: int, code: str) -> KnownHive:
    """Pair this keeper with the hive listening for pairing at ``host:pair_port``."""
    mine = load_or_create(data_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    endpoint = f"tcp://{host}:{pair_port}" if ":" not in host else f"tcp://[{host}]:{pair_port}"
    client = DealerClient(ctx, endpoint, plaintext_ok=True)  # SPAKE2 protects it
    try:
        spake = SPAKE2_A(_secret(code), idA=ID_KEEPER, idB=ID_HIVE)
        try:
            reply = client.request(PairHello(msg=spake.start()), STEP_TIMEOUT_S)
        except HiveUnreachable:
            raise HiveUnreachable(
                f"nothing is waiting to pair at {host}:{pair_port}",
                suggestion="run `rbee hive pair` on the hive first (the code lasts 5 minutes)",
            ) from None
        assert isinstance(reply, PairHelloReply)
        try:
            key = spake.finish(reply.msg)
        except Exception:
            raise AccessDenied("the hive's pairing message is malformed") from None
        confirm = PairConfirm(key=mine.public, mac=_mac(key, b"keeper", mine.public))
        accepted = client.request(confirm, STEP_TIMEOUT_S)
        assert isinstance(accepted, PairAccepted)
        if not hmac.compare_digest(_accepted_mac(key, accepted), accepted.mac):
            raise AccessDenied("the hive's answer does not match the code: not paired")
        known = KnownHive(
            accepted.node_id, accepted.key, f"{host}:{accepted.router_port}", accepted.node
        )
        KnownHives(data_dir).pin(known)
        return known
    except RbeeError:
        raise
    finally:
        client.close()
        ctx.destroy(linger=0)
