"""The hives this hive may borrow memory from, and what each has free.

A hive borrows only from hives whose key it has itself authorized with the ``hive`` role: the
trust is mutual and explicit (each side runs `rbee hive authorize KEY --role hive` for the
other), never granted because something answered on the LAN. A thread looks every
PEERS_EVERY_S: it browses mDNS, asks each trusted hive that announces lending for its Status
over CURVE with this hive's key, and keeps the answers; placement reads the latest picture
without waiting for the LAN.
"""

from __future__ import annotations

import threading

import zmq

from rbee import discovery, log
from rbee.errors import RbeeError
from rbee.hive.placement import Lender
from rbee.protocol.messages import HiveStatus, Status
from rbee.transport.keys import AuthorizedKeys, KeyPair
from rbee.transport.sockets import Curve, DealerClient, tcp_endpoint

logger = log.get(__name__)

PEERS_EVERY_S = 10.0
BROWSE_S = 1.0
ASK_TIMEOUT_S = 2.0


class Peers:
    """The latest view of the trusted hives that lend (one thread keeps it fresh)."""

    def __init__(self, keys: KeyPair, authorized: AuthorizedKeys, node: str) -> None:
        self.keys = keys
        self.authorized = authorized
        self.node = node
        self._lenders: tuple[Lender, ...] = ()
        self._lock = threading.Lock()
        self.looked = threading.Event()  # set after each look (tests wait on it)
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
        """Trusted hives that lend, most free memory first, as last seen."""
        with self._lock:
            return self._lenders

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            while not self._stop.is_set():
                found = self.look(ctx)
                with self._lock:
                    self._lenders = found
                self.looked.set()
                self._stop.wait(PEERS_EVERY_S)
        finally:
            ctx.destroy(linger=0)

    def look(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> tuple[Lender, ...]:
        """Browse, then ask every trusted hive that announces itself for its free memory."""
        found: list[Lender] = []
        if "hive" not in {role for role, _ in self.authorized.roles().values()}:
            return ()  # no hive trusted to lend: nothing to look for
        for a in discovery.browse(timeout_s=BROWSE_S):
            if not a.key or a.key == self.keys.public or self.authorized.role(a.key) != "hive":
                continue
            endpoint = tcp_endpoint(a.address, a.port)
            client = DealerClient(ctx, endpoint, Curve(self.keys.public, self.keys.secret, a.key))
            try:
                status = client.request(Status(), ASK_TIMEOUT_S)
            except RbeeError as exc:
                logger.info("peer did not answer", peer=a.node, error=str(exc)[:200])
                continue
            finally:
                client.close()
            if isinstance(status, HiveStatus) and status.lends:
                found.append(Lender(status.node, endpoint, a.key, status.lendable_bytes))
        found.sort(key=lambda lender: -lender.free_bytes)
        if found:
            logger.debug("lenders", peers=[f"{x.node} {x.free_bytes >> 20} MiB" for x in found])
        return tuple(found)
