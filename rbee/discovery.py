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

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
from zeroconf import (
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from rbee import log
from rbee.errors import InvalidRequest

SERVICE_TYPE = "_rbee._tcp.local."
RECORD_TTL_S = 4  # a silent hive's records expire (and it disappears) within seconds
BROWSE_TIMEOUT_S = 1.0
SETTLE_S = 0.2  # answers are complete once none is new for this long
RESOLVE_TIMEOUT_S = 0.5
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


def _service_name(node: str, nid: str) -> str:
    label = "".join(c if c.isalnum() or c == "-" else "-" for c in node)[:40] or "hive"
    return f"{label}-{nid[:8]}.{SERVICE_TYPE}"


class Announcer:
    """Keeps one hive's service registered; re-announces on change, says goodbye on close."""

    def __init__(self, announcement: Announcement, addresses: list[str]) -> None:
        self.zc = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        self.addresses = addresses
        self.info = self._info(announcement)
        self.zc.register_service(self.info, allow_name_change=True)
        logger.info("announced", service=self.info.name, addresses=addresses)

    def _info(self, a: Announcement) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            _service_name(a.node, a.node_id),
            addresses=[socket.inet_aton(x) for x in self.addresses],
            port=a.port,
            properties=a.txt(),
            server=f"{_service_name(a.node, a.node_id).split('.')[0]}.local.",
            host_ttl=RECORD_TTL_S,
            other_ttl=RECORD_TTL_S,
        )

    def update(self, announcement: Announcement) -> None:
        """Re-announce (the backends or versions changed)."""
        info = self._info(announcement)
        info.name = self.info.name
        self.info = info
        self.zc.update_service(info)

    def close(self) -> None:
        """Say goodbye so browsers drop this hive at once."""
        try:
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


def browse(timeout_s: float = BROWSE_TIMEOUT_S, settle_s: float = SETTLE_S) -> list[Announcement]:
    """The hives answering on the LAN: returns once answers settle (or at ``timeout_s``)."""
    addresses = interfaces()
    if not addresses:
        return []
    zc = Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
    found: dict[str, Announcement] = {}
    lock = threading.Lock()
    last_new = [0.0]
    started = time.monotonic()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            with lock:
                found.pop(name, None)
            return
        info = ServiceInfo(service_type, name)
        if not info.load_from_cache(zeroconf):
            info.request(zeroconf, int(RESOLVE_TIMEOUT_S * 1000))
        parsed = _parse(info)
        if parsed is not None and parsed.cluster == cluster():
            with lock:
                found[name] = parsed
                last_new[0] = time.monotonic()

    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    try:
        while True:
            now = time.monotonic()
            if now - started >= timeout_s:
                break
            with lock:
                if found and now - last_new[0] >= settle_s:
                    break
            time.sleep(0.01)
    finally:
        browser.cancel()
        zc.close()
    with lock:
        return sorted(found.values(), key=lambda a: a.node)


def cluster() -> str:
    """The pool this machine belongs to (RBEE_CLUSTER, default "default"): keepers only see
    hives of their own cluster, so two pools can share one LAN (and tests never meet)."""
    return os.environ.get("RBEE_CLUSTER", "").strip() or "default"


def seeds() -> list[str]:
    """HOST[:PORT] of hives to ask directly (RBEE_SEEDS), for networks without multicast."""
    return [s.strip() for s in os.environ.get("RBEE_SEEDS", "").split(",") if s.strip()]
