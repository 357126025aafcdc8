"""A LAN of network namespaces for tests and benchmarks: a switch namespace holding a bridge,
and N host namespaces, each with one veth "eth0" on the bridge, its own address and multicast.

Traffic stays inside namespaces this module creates, and ``Lan.close`` deletes them all (tests
use it as a context manager, so it runs when a test fails too).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

SUBNET = "10.77.{n}.{host}"
CLONE_NEWNET = 0x40000000
PREFIX_LEN = 24


def available() -> str:
    """Why a LAN cannot be built here ("" if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class Host:
    """One host namespace."""

    ns: str
    address: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *argv]


@dataclass
class Lan:
    """The namespaces of one test LAN."""

    tag: str
    hosts: list[Host] = field(default_factory=list)
    switch: str = ""

    @classmethod
    def create(cls, count: int, subnet: int = 0) -> Lan:
        """A bridge and ``count`` hosts on 10.77.SUBNET.0/24 (names unique to this process)."""
        tag = f"rb{os.getpid() % 100000}s{subnet}"
        lan = cls(tag=tag, switch=f"{tag}sw")
        try:
            _ip("netns", "add", lan.switch)
            sw = ["-n", lan.switch]
            _ip(*sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip(*sw, "link", "set", "br0", "up")
            for i in range(1, count + 1):
                host = Host(ns=f"{tag}h{i}", address=SUBNET.format(n=subnet, host=i))
                _ip("netns", "add", host.ns)
                lan.hosts.append(host)
                _ip("link", "add", f"{tag}p{i}", "type", "veth", "peer", "name", f"{tag}q{i}")
                _ip("link", "set", f"{tag}p{i}", "netns", lan.switch)
                _ip("link", "set", f"{tag}q{i}", "netns", host.ns)
                _ip(*sw, "link", "set", f"{tag}p{i}", "master", "br0", "up")
                hn = ["-n", host.ns]
                _ip(*hn, "link", "set", f"{tag}q{i}", "name", "eth0")
                _ip(*hn, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", "eth0")
                _ip(*hn, "link", "set", "eth0", "multicast", "on", "up")
                _ip(*hn, "link", "set", "lo", "up")
                _ip(*hn, "route", "add", "224.0.0.0/4", "dev", "eth0")
        except BaseException:
            lan.close()
            raise
        return lan

    def close(self) -> None:
        """Delete every namespace (their veths go with them); safe to call twice."""
        for ns in [h.ns for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)
        self.hosts.clear()

    def __enter__(self) -> Lan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def inside(host: Host) -> Iterator[None]:
    """Run this thread inside ``host``'s namespace for a while: a socket made meanwhile (a
    test server's) stays there, reachable from the other hosts, while the test process stays
    where it is."""
    libc = ctypes.CDLL(None, use_errno=True)
    with (
        open("/proc/thread-self/ns/net", "rb") as here,
        open(f"/run/netns/{host.ns}", "rb") as there,
    ):
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter {host.ns}")
        try:
            yield
        finally:
            if libc.setns(here.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot go back to the test's namespace")


def leftover_namespaces(tag: str) -> list[str]:
    """Namespaces of ours still present (a test checks cleanup with this)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag)]
