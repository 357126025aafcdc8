"""A lender that is alive but makes no progress: told apart from a slow one and an idle one.

A lender that dies, is stopped (SIGSTOP) or loses its hive is seen at once (rbee.hive.lending,
rbee.hive.borrow). One that is alive yet does nothing (deadlocked, frozen by a cgroup, its
GPU hung) still answers its hive's questions about it, so the stream would hang. The borrowing
hive therefore watches each worker that borrows memory while it runs a job: the worker is stuck
on a lender when, for ``stall_s``, no byte came back from any of its lenders AND neither the
worker nor its lenders used CPU time (below BUSY_CPU_SHARE of one core: background threads
only). Each condition alone would be wrong: a long prompt on this hive's own layers leaves the
lenders idle, and a long compute on a lender's GPU sends no byte for a while. Nothing counts
while the worker runs no job: a loaded borrower may be idle for hours, and so are its lenders.

The lenders' CPU time comes from their hives, in the answers to the tunnels' pings (LeaseState);
the lender to blame is the one the worker sent bytes to after the last it heard from it (what
it waits for), else every lender of the worker. Pure: numbers in, a reason out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

STALL_S = 10.0  # the default of the hive setting lender_stall_s
BUSY_CPU_SHARE = 0.05  # of one core: more than background threads use, far less than a compute


@dataclass(frozen=True)
class LinkState:
    """What the borrowing hive knows of one lender of a worker (one Tunnel)."""

    name: str  # the lending hive
    cpu_s: float  # its lender's CPU time, as its hive last said
    bytes_in: int  # bytes that came back from it so far
    awaited: bool  # the worker sent it bytes after the last it heard from it


@dataclass(frozen=True)
class _Mark:
    since: float
    worker_cpu_s: float
    links: tuple[LinkState, ...]


class StallWatch:
    """The workers that borrow memory, each with when anything last moved."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self.marks: dict[str, _Mark] = {}

    def check(
        self, worker: str, busy: bool, worker_cpu_s: float, links: Sequence[LinkState], now: float
    ) -> tuple[str, list[str]]:
        """("", []) while ``worker`` makes progress or runs no job; else the reason and the
        names of the lenders to blame."""
        if not busy or not links:
            self.marks.pop(worker, None)
            return "", []
        mark = self.marks.get(worker)
        if mark is None or _moved(mark, worker_cpu_s, links, now):
            self.marks[worker] = _Mark(now, worker_cpu_s, tuple(links))
            return "", []
        if now - mark.since < self.stall_s:
            return "", []
        self.marks.pop(worker, None)
        blamed = [x.name for x in links if x.awaited] or [x.name for x in links]
        reason = (
            f"its lender stopped making progress: no bytes from it and no CPU time used by it "
            f"or by the worker for {self.stall_s:g} s while a job ran"
        )
        return reason, blamed

    def forget(self, worker: str) -> None:
        """The worker is gone."""
        self.marks.pop(worker, None)


def _moved(mark: _Mark, worker_cpu_s: float, links: Sequence[LinkState], now: float) -> bool:
    """Whether anything advanced since ``mark``: a byte back, or CPU time used beyond what
    background threads use over the time passed."""
    if len(links) != len(mark.links):
        return True
    floor = BUSY_CPU_SHARE * (now - mark.since)
    if worker_cpu_s - mark.worker_cpu_s > floor:
        return True
    for before, link in zip(mark.links, links, strict=True):
        if link.bytes_in != before.bytes_in or link.cpu_s - before.cpu_s > floor:
            return True
    return False
