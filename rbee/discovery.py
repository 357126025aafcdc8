"""Finding hives on the LAN: a hive announces ``_rbee._tcp.local.`` with zeroconf, a keeper browses.

A hive's TXT record says who it is (node name, a stable node id, versions, ports, backends). Its
records carry a short TTL (RECORD_TTL_S) instead of mDNS's default of over an hour, so a hive that
died without a goodbye drops out of every browser within seconds; the keeper still checks a hive
with a deadline before it relies on an announcement.

Pools: ``RBEE_CLUSTER`` names the pool a hive belongs to; keepers only use hives of their own.
Interfaces: ``RBEE_MDNS_INTERFACES`` (a comma list of addresses or interface names) chooses where
to announce and browse; by default every interface with an IPv4 address except loopback and the
virtual ones (docker, bridges, veth pairs). Networks without multicast use seed hosts instead
(``RBEE_SEEDS``: a comma list of HOST[:PORT]), which the keeper asks directly.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from zeroconf import (
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceInfo,
    Zeroconf,
)
from zeroconf._dns import DNSPointer, DNSQuestion  # no public API sends a one-shot query
from zeroconf._protocol.outgoing import DNSOutgoing

from rbee import log
from rbee.errors import InvalidRequest

SERVICE_TYPE = "_rbee._tcp.local."
RECORD_TTL_S = 4  # a silent hive's records expire (and it disappears) within seconds
BROWSE_TIMEOUT_S = 1.0
SETTLE_S = 0.2  # answers are complete once none is new for this long
RESOLVE_TIMEOUT_S = 0.5
FIRST_RETRY_S = 0.25  # a query nobody answered is sent again, at doubling intervals up to 1 s
REGISTER_WAIT_S = 3.0
DNS_PTR, DNS_IN, DNS_QUERY = 12, 1, 0  # RFC 1035 type, class and flags
VIRTUAL_PREFIXES = ("lo", "docker", "br-", "veth", "virbr", "cni", "flannel", "vxlan")
MAX_TXT_VALUE = 200

logger = log.get(__name__)


@dataclass(frozen=True)
class Announcement:
    """What a hive says about itself on the LAN."""

    node: str
    node_id: str
    address: str
    port: int
    stream_port: int
    rbee_version: str
    protocol_version: int
    backends: str = "cpu"
    key: str = ""
    cluster: str = "default"

    @property
    def endpoint(self) -> str:
        """HOST:PORT of its request socket."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def txt(self) -> dict[str, str]:
        """The TXT record."""
        return {
            "node": self.node[:MAX_TXT_VALUE],
            "id": self.node_id,
            "v": self.rbee_version,
            "proto": str(self.protocol_version),
            "port": str(self.port),
            "sport": str(self.stream_port),
            "be": self.backends[:MAX_TXT_VALUE],
            "key": self.key,
            "cl": self.cluster,
        }


def node_id(data_dir: Path) -> str:
    """This machine's stable node id (made once, kept in the data directory)."""
    path = data_dir / "node_id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return value


def interfaces() -> list[str]:
    """IPv4 addresses to announce and browse on (RBEE_MDNS_INTERFACES or the real interfaces)."""
    by_name = {
        name: [a.address for a in addrs if a.family == socket.AF_INET]
        for name, addrs in psutil.net_if_addrs().items()
    }
    wanted = os.environ.get("RBEE_MDNS_INTERFACES", "").strip()
    if wanted:
        chosen: list[str] = []
        for item in (w.strip() for w in wanted.split(",") if w.strip()):
            if item in by_name:
                chosen += by_name[item]
            else:
                try:
                    socket.inet_aton(item)
                except OSError:
                    raise InvalidRequest(
                        f"RBEE_MDNS_INTERFACES names {item!r}: no such interface or IPv4 address",
                        suggestion=f"interfaces here: {', '.join(sorted(by_name))}",
                    ) from None
                chosen.append(item)
        return chosen
    return [
        address
        for name, addresses in by_name.items()
        if not name.startswith(VIRTUAL_PREFIXES)
        for address in addresses
    ]


def _instance_label(a: Announcement) -> str:
    """``node-nodeid-address``: unique by construction (two machines never share an address),
    so the hive need not probe for conflicts, and a cloned node id still shows as two hives."""
    node = "".join(c if c.isalnum() or c == "-" else "-" for c in a.node)[:32] or "hive"
    return f"{node}-{a.node_id[:8]}-{a.address.replace('.', '-')}"


class Announcer:
    """Keeps one hive's service registered; re-announces on change, says goodbye on close.

    Registration skips mDNS probing (1.2 s of waiting before the first announcement) because
    the instance name is unique by construction, and it runs on zeroconf's own thread (three
    announcements 225 ms apart) while the hive starts serving.
    """

    def __init__(self, announcement: Announcement, addresses: list[str]) -> None:
        self.zc = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        self.addresses = addresses
        self.announcement = announcement
        self.info = self._info(announcement)
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        assert self.zc.loop is not None
        self._registered: Future[Any] = asyncio.run_coroutine_threadsafe(
            self.zc.async_register_service(self.info, cooperating_responders=True), self.zc.loop
        )
        logger.info("announced", service=self.info.name, addresses=addresses)

    def _info(self, a: Announcement) -> ServiceInfo:
        label = _instance_label(a)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(x) for x in self.addresses],
            port=a.port,
            properties=a.txt(),
            server=f"{label}.local.",
            host_ttl=RECORD_TTL_S,
            other_ttl=RECORD_TTL_S,
        )

    def update(self, announcement: Announcement) -> None:
        """Re-announce (the backends or versions changed)."""
        self._registered.result(REGISTER_WAIT_S)
        self.announcement = announcement
        self.info = self._info(announcement)
        self.zc.update_service(self.info)
        logger.info("re-announced", service=self.info.name, backends=announcement.backends)

    def follow(self, describe: Callable[[], Announcement], every_s: float) -> None:
        """Ask ``describe`` every ``every_s`` and re-announce when its answer changes (a GPU
        appeared or went), on a thread of its own: an update takes ~0.7 s of broadcasts."""

        def check() -> None:
            while not self._stop.wait(every_s):
                try:
                    current = describe()
                    if current != self.announcement:
                        self.update(current)
                except Exception as exc:  # a failed check must not end the announcing
                    logger.warning("announcement not refreshed", error=str(exc))

        self._follower = threading.Thread(target=check, name="mdns-follow", daemon=True)
        self._follower.start()

    def close(self) -> None:
        """Say goodbye so browsers drop this hive at once."""
        self._stop.set()
        if self._follower is not None:
            self._follower.join(REGISTER_WAIT_S)
        try:
            self._registered.result(REGISTER_WAIT_S)
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


def _parse(info: ServiceInfo) -> Announcement | None:
    props = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else "")
        for k, v in info.properties.items()
    }
    addresses = info.parsed_addresses(IPVersion.V4Only)
    try:
        return Announcement(
            node=props["node"],
            node_id=props["id"],
            address=addresses[0],
            port=int(props.get("port") or info.port or 0),
            stream_port=int(props["sport"]),
            rbee_version=props.get("v", ""),
            protocol_version=int(props.get("proto", "0")),
            backends=props.get("be", ""),
            key=props.get("key", ""),
            cluster=props.get("cl", "default"),
        )
    except (KeyError, IndexError, ValueError):
        return None  # not an rbee hive we can talk to; ignored


class _Answers(RecordUpdateListener):
    """Names of rbee services as their PTR answers arrive (called on zeroconf's thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrived: dict[str, float] = {}  # service name → when it was first heard

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            record = update.new
            if isinstance(record, DNSPointer) and record.name == SERVICE_TYPE and record.ttl > 0:
                with self.lock:
                    self.arrived.setdefault(record.alias, time.monotonic())


def browse(timeout_s: float = BROWSE_TIMEOUT_S, settle_s: float = SETTLE_S) -> list[Announcement]:
    """The hives answering on the LAN: returns once answers settle (or at ``timeout_s``).

    One-shot mDNS queries (RFC 6762 section 5.1) from a port of our own: every hive answers at
    once by unicast, without the 20-120 ms delay of multicast answers, and the answers reach
    this process even where a hive on the same machine shares port 5353 (a unicast datagram
    reaches only one of the sockets sharing a port). Unanswered queries are repeated.
    """
    addresses = interfaces()
    if not addresses:
        return []
    started = time.monotonic()
    zc = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only, unicast=True)
    question = DNSQuestion(SERVICE_TYPE, DNS_PTR, DNS_IN)
    question.unicast = True  # QU: never taken for a repeat of a recent query and ignored
    answers = _Answers()
    zc.add_listener(answers, question)
    found: dict[str, Announcement] = {}
    heard: set[str] = set()
    next_query, retry = started, FIRST_RETRY_S
    try:
        while (now := time.monotonic()) - started < timeout_s:
            with answers.lock:
                arrived = dict(answers.arrived)
            if arrived and now - max(arrived.values()) >= settle_s and heard >= arrived.keys():
                break
            if now >= next_query and not arrived:
                query = DNSOutgoing(DNS_QUERY, True, random.randint(1, 0xFFFF))
                query.add_question(question)
                zc.send(query)
                next_query, retry = now + retry, min(retry * 2, 1.0)
            for name in arrived.keys() - heard:
                heard.add(name)
                info = ServiceInfo(SERVICE_TYPE, name)
                if not info.load_from_cache(zc):
                    info.request(zc, int(RESOLVE_TIMEOUT_S * 1000))
                parsed = _parse(info)
                if parsed is not None and parsed.cluster == cluster():
                    found[name] = parsed
            time.sleep(0.005)
    finally:
        zc.close()
    return sorted(found.values(), key=lambda a: a.node)


def cluster() -> str:
    """The pool this machine belongs to (RBEE_CLUSTER, default "default"): keepers only see
    hives of their own cluster, so two pools can share one LAN (and tests never meet)."""
    return os.environ.get("RBEE_CLUSTER", "").strip() or "default"


def seeds() -> list[str]:
    """HOST[:PORT] of hives to ask directly (RBEE_SEEDS), for networks without multicast."""
    return [s.strip() for s in os.environ.get("RBEE_SEEDS", "").split(",") if s.strip()]
