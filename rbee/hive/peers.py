"""The hives this hive may borrow memory from, and what each has free.

A hive borrows only from hives it has paired with: their keys are pinned in its data
directory's ``known_hives`` (`rbee hive pair --role hive` there, `rbee pair NODE CODE` with this
hive's data directory here), never from something that merely answered on the LAN; and a lender
lends only to keys it gave the ``hive`` or ``admin`` role. A thread looks every PEERS_EVERY_S
while any hive is pinned: it browses mDNS, asks each pinned hive whose announced key matches
for its Status over CURVE with this hive's key, and keeps those that lend; placement reads the
latest picture without waiting for the LAN. Downloads ask the same trusted hives for model files
(``trusted_hives``, rbee.hive.peer_files).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import zmq

from rbee import discovery, log
from rbee.errors import RbeeError
from rbee.hive.placement import Lender
from rbee.protocol.messages import HiveStatus, Status
from rbee.transport.keys import KeyPair, KnownHives
from rbee.transport.sockets import Curve, DealerClient, tcp_endpoint

logger = log.get(__name__)

PEERS_EVERY_S = 10.0
CHECK_EVERY_S = 1.0
BROWSE_S = 1.0
ASK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Peer:
    """A trusted hive: its name, front socket and CURVE key."""

    node: str
    endpoint: str
    key: str


def trusted_hives(keys: KeyPair, known: KnownHives) -> list[Peer]:
    """The hives this one paired with as hives that announce themselves now (key checked)."""
    if not known.entries():
        return []
    found: dict[str, Peer] = {}
    for a in discovery.browse(timeout_s=BROWSE_S):
        pinned = known.find(node_id=a.node_id)
        if pinned is None or pinned.key != a.key or a.key == keys.public:
            continue
        found.setdefault(a.key, Peer(a.node, tcp_endpoint(a.address, a.port), a.key))
    return list(found.values())


class Peers:
    """The latest view of the trusted hives that lend (one thread keeps it fresh)."""

    def __init__(self, keys: KeyPair, known: KnownHives) -> None:
        self.keys = keys
        self.known = known
        self._lenders: tuple[Lender, ...] = ()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peers", daemon=True)

    def start(self) -> Peers:
        """Begin looking."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop looking."""
        self._stop.set()
        self._thread.join(BROWSE_S + ASK_TIMEOUT_S + 1)

    def lenders(self) -> tuple[Lender, ...]:
        """Trusted hives that lend, those lending a GPU first, then by most free memory, as
        last seen."""
        with self._lock:
            return self._lenders

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        looked_at, pinned = -PEERS_EVERY_S, self._pinned()
        try:
            while not self._stop.wait(CHECK_EVERY_S):
                now, stamp = time.monotonic(), self._pinned()
                if now - looked_at < PEERS_EVERY_S and stamp == pinned:
                    continue  # a new pairing is looked at at once, else every PEERS_EVERY_S
                found = self.look(ctx)
                with self._lock:
                    self._lenders = found
                looked_at, pinned = time.monotonic(), stamp
        finally:
            ctx.destroy(linger=0)

    def _pinned(self) -> float:
        with contextlib.suppress(OSError):
            return self.known.path.stat().st_mtime
        return 0.0

    def look(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> tuple[Lender, ...]:
        """Browse, then ask every trusted hive that announces itself for its free memory."""
        found: list[Lender] = []
        for peer in trusted_hives(self.keys, self.known):
            curve = Curve(self.keys.public, self.keys.secret, peer.key)
            client = DealerClient(ctx, peer.endpoint, curve)
            try:
                status = client.request(Status(), ASK_TIMEOUT_S)
            except RbeeError as exc:
                logger.info("peer did not answer", peer=peer.node, error=str(exc)[:200])
                continue
            finally:
                client.close()
            if isinstance(status, HiveStatus) and status.lends_to_you:
                gpu = status.lendable_kind == "cuda"
                found.append(
                    Lender(status.node, peer.endpoint, peer.key, status.lendable_bytes, gpu)
                )
            elif isinstance(status, HiveStatus):
                why = (
                    "it lends to keys with the hive role only"
                    if status.lends
                    else "it does not lend"
                )
                logger.info("peer skipped", peer=status.node, reason=why)
        found.sort(key=lambda lender: (not lender.gpu, -lender.free_bytes))  # GPUs first
        if found:
            said = [f"{x.node} {x.free_bytes >> 20} MiB{' GPU' if x.gpu else ''}" for x in found]
            logger.debug("lenders", peers=said)
        return tuple(found)
