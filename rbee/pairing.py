"""Pairing a keeper with a hive using one short code, so nobody copies keys by hand.

`rbee hive pair` (on the hive's machine) prints a one-time code and listens on the pairing port
(the hive's port + 2) for a few minutes; `rbee pair NODE CODE` (on the keeper's machine) runs
SPAKE2 with it. Both sides derive the same key only if they used the same code; each then sends
its CURVE public key with a MAC under that key, so each side learns the other's key and knows it
came from whoever holds the code. A man in the middle sees only SPAKE2 messages, from which the
code cannot be recovered offline (that is SPAKE2's guarantee); guessing online is limited to
MAX_FAILURES tries, after which the code is void. Afterwards the hive admits the keeper's key
(authorized_keys, with the role chosen) and the keeper pins the hive's key (known_hives).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from spake2 import SPAKE2_A, SPAKE2_B

from rbee import log
from rbee.errors import AccessDenied, HiveUnreachable, RbeeError, Timeout
from rbee.protocol.codec import PAIRING
from rbee.protocol.messages import (
    PairAccepted,
    PairConfirm,
    PairHello,
    PairHelloReply,
)
from rbee.transport.keys import AuthorizedKeys, KnownHive, KnownHives, fingerprint, load_or_create
from rbee.transport.sockets import DealerClient, RouterServer, bind_endpoint, new_socket

PAIR_PORT_OFFSET = 2
PAIR_WINDOW_S = 300.0
MAX_FAILURES = 3
STEP_TIMEOUT_S = 5.0
ID_KEEPER = b"rbee keeper"
ID_HIVE = b"rbee hive"

logger = log.get(__name__)


def new_code() -> str:
    """A one-time code people can read out: eight digits in two groups."""
    value = f"{secrets.randbelow(10**8):08d}"
    return f"{value[:4]}-{value[4:]}"


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
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = new_socket(ctx, zmq.ROUTER, PAIRING)
    try:
        bind_endpoint(sock, host, port)
        server = RouterServer(sock, bounds=PAIRING)
        sessions: dict[bytes, SPAKE2_B] = {}
        shared: dict[bytes, bytes] = {}
        failures = 0
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            if not sock.poll(200):
                continue
            incoming = server.recv()
            if incoming is None:
                continue
            who, frame, rid = incoming.identity, incoming.envelope.frame, incoming.envelope.rid
            if isinstance(frame, PairHello):
                spake = SPAKE2_B(_secret(code), idA=ID_KEEPER, idB=ID_HIVE)
                sessions[who] = spake
                reply = spake.start()
                try:
                    shared[who] = spake.finish(frame.msg)
                except Exception:  # a malformed SPAKE2 message counts as a failed try
                    failures += 1
                    server.reply_error(who, rid, AccessDenied("pairing failed"))
                    continue
                server.send(who, PairHelloReply(msg=reply), rid)
            elif isinstance(frame, PairConfirm) and who in shared:
                key = shared.pop(who)
                expected = _mac(key, b"keeper", frame.key)
                if not hmac.compare_digest(expected, frame.mac):
                    failures += 1
                    logger.warning("pairing attempt with a wrong code", failures=failures)
                    server.reply_error(who, rid, AccessDenied("wrong pairing code"))
                    if failures >= MAX_FAILURES:
                        raise AccessDenied(
                            f"{failures} wrong codes: this pairing code is void",
                            suggestion="run `rbee hive pair` again for a new code",
                        )
                    continue
                AuthorizedKeys(data_dir).authorize(frame.key, role, "paired")
                mac = _mac(key, b"hive", keys.public, hive.node_id, hive.node, role)
                accepted = PairAccepted(
                    key=keys.public,
                    node_id=hive.node_id,
                    node=hive.node,
                    role=role,
                    router_port=hive.router_port,
                    mac=mac,
                )
                server.send(who, accepted, rid)
                logger.info("paired", key=fingerprint(frame.key), role=role)
                time.sleep(0.2)  # let the reply leave before the socket closes
                return frame.key
            else:
                server.reply_error(who, rid, AccessDenied("pairing messages out of order"))
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
        expected = _mac(key, b"hive", accepted.key, accepted.node_id, accepted.node, accepted.role)
        if not hmac.compare_digest(expected, accepted.mac):
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
