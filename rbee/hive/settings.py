"""A hive's settings and the state its request handlers share.

The hive is one class split by concern across modules (server: sockets, loop and workers;
provision: models and workers for requests; jobs: the queue and the token streams). ``HiveState``
declares what they share, so each part type-checks on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from rbee.catalog import Catalog, ModelEntry
from rbee.hive.placement import MemoryEstimate, Placement
from rbee.hive.pool import WorkerPool
from rbee.hive.pulls import Pulls
from rbee.hive.registry import JobRecord, Limits, WorkerRecord
from rbee.hive.streams import StreamGate
from rbee.transport.keys import AuthorizedKeys
from rbee.transport.sockets import RouterServer

DRAIN_GRACE_S = 10.0
RETRY_AFTER_S = 2.0
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class HiveConfig:
    """How a hive runs: where it listens and what it may do."""

    host: str
    port: int
    stream_port: int
    data_dir: Path
    node: str = ""
    ephemeral: bool = False
    preload: str = ""  # a model whose worker starts loading at once (an ephemeral hive's)
    limits: Limits = field(default_factory=Limits)
    keep_alive_s: float = 300.0
    drain_grace_s: float = DRAIN_GRACE_S
    secure: bool = False  # CURVE even on loopback (always on for any other address)
    threads: int = 0  # CPU threads per worker; 0: as many as llama.cpp's own default

    @property
    def loopback_only(self) -> bool:
        """Development mode: nothing but this machine can reach the hive."""
        return self.host in LOOPBACK_HOSTS


class HiveState:
    """What every part of the hive reads and writes (set up by ``Hive.__init__``)."""

    config: HiveConfig
    node: str
    catalog: Catalog
    front: RouterServer
    xpub: zmq.Socket[bytes]
    xsub: zmq.Socket[bytes]
    pool: WorkerPool
    pulls: Pulls
    authorized: AuthorizedKeys
    jobs: dict[str, JobRecord]
    queue: list[JobRecord]
    streams: StreamGate
    secure: bool
    role: str  # of the request being handled
    caller: str  # its CURVE key ("" on a development-mode hive)
    draining_since: float
    dropped_stream_frames: int
    wants: dict[tuple[bytes, int], tuple[str, str]]  # (who, rid) of a pull → backend, device

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        """The worker registry (id → record)."""
        return self.pool.workers

    @property
    def draining(self) -> bool:
        """Whether the hive is shutting down (it takes no new work)."""
        return self.draining_since > 0

    if TYPE_CHECKING:  # provided by the parts; declared for the type checker only

        def _resolve(self, reference: str) -> ModelEntry: ...
        def _place(self, backend: str, device: str) -> Placement: ...
        def _context(self, entry: ModelEntry, n_ctx: int) -> int: ...
        def _spawn(
            self,
            entry: ModelEntry,
            n_ctx: int,
            where: Placement | None = None,
            needed: MemoryEstimate | None = None,
        ) -> WorkerRecord: ...
        def _require_admin(self, what: str) -> None: ...
        def _schedule(self, now: float) -> None: ...
