"""Downloads the hive runs in the background: one per model, shared by everyone who asks.

A pull runs on its own thread (huggingface_hub and the transfer block); its progress and its
result come back through a queue that the loop thread drains, so sockets stay on the loop thread.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rbee import log
from rbee.errors import InternalError, RbeeError
from rbee.hive.metrics import HiveMetrics
from rbee.hive.request import Request

if TYPE_CHECKING:
    from rbee.hub.download import DownloadManager, PulledFile
    from rbee.hub.transfer import PeerBytes, Sources

DOWNLOAD_PROGRESS_EVERY_S = 0.5  # how often a waiting keeper hears how a download goes

logger = log.get(__name__)


@dataclass(frozen=True)
class PullWaiter:
    """A request waiting for a download: just the model ("pull"), or a worker for it ("ensure",
    on the backend and device it asked for, with its context size)."""

    request: Request
    purpose: Literal["pull", "ensure"]
    n_ctx: int = 0
    backend: str = "cpu"
    device: str = ""


@dataclass(eq=False)
class Pull:
    """One download and who waits for it."""

    reference: str
    hub: bool = True  # may ask the Hub
    peers: bool = True  # asks peer hives first
    waiters: list[PullWaiter] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    done_bytes: int = 0
    total_bytes: int = 0
    rate: float = 0.0
    eta_s: float | None = None
    told_at: float = 0.0
    sources: Sources | None = None  # set when it starts: says where bytes come from


@dataclass(frozen=True)
class Finished:
    """A pull ended: its files, or the error that stopped it."""

    pull: Pull
    files: list[PulledFile]
    error: RbeeError | None


class Pulls:
    """The hive's downloads. The download manager (httpx, huggingface_hub: ~0.15 s of
    imports) is made at the first pull, so a hive that never downloads starts without it."""

    def __init__(
        self,
        models_dir: Path,
        manager: DownloadManager | None = None,
        metrics: HiveMetrics | None = None,
        peers: PeerBytes | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.peers = peers  # trusted hives to fetch from first (None: the Hub only)
        self.metrics = metrics or HiveMetrics("")  # bytes and failures, counted on pull threads
        self._manager = manager
        self._manager_lock = threading.Lock()  # pull threads make it
        self.active: dict[str, Pull] = {}
        self.results: queue.Queue[Finished] = queue.Queue()

    @property
    def manager(self) -> DownloadManager:
        """The download manager, made on first use."""
        with self._manager_lock:
            if self._manager is None:
                from rbee.hub.download import DownloadManager

                self._manager = DownloadManager(self.models_dir)
            return self._manager

    def join(
        self, reference: str, waiter: PullWaiter, *, hub: bool = True, peers: bool = True
    ) -> Pull:
        """Wait for ``reference`` (a canonical hf: reference), starting its download if needed
        (``hub``/``peers``: where that download may take bytes from)."""
        pull = self.active.get(reference)
        if pull is None:
            pull = Pull(reference, hub=hub, peers=peers)
            self.active[reference] = pull
            threading.Thread(
                target=self._run, args=(pull,), name=f"pull {reference}", daemon=True
            ).start()
            logger.info("pull started", reference=reference)
        pull.waiters.append(waiter)
        return pull

    def _run(self, pull: Pull) -> None:
        moved = -1  # the first report says where the transfer starts: resumed bytes are not new

        def progress(done: int, total: int, rate: float, eta: float | None) -> None:
            nonlocal moved
            if 0 <= moved < done:
                self.metrics.downloaded(done - moved)
            moved = done
            pull.done_bytes, pull.total_bytes, pull.rate, pull.eta_s = done, total, rate, eta

        from rbee.hub.transfer import Sources

        pull.sources = Sources(self.peers if pull.peers else None, pull.hub)
        try:
            files = self.manager.pull(pull.reference, progress, pull.cancel, sources=pull.sources)
            self.results.put(Finished(pull, files, None))
        except RbeeError as exc:
            self.metrics.download_failed(exc.code)
            self.results.put(Finished(pull, [], exc))
        except Exception as exc:  # a bug must reach the waiting keepers, not vanish
            logger.exception("pull failed", reference=pull.reference)
            self.metrics.download_failed(InternalError.code)
            self.results.put(Finished(pull, [], InternalError.of(exc)))

    def finished(self) -> list[Finished]:
        """Pulls that ended since the last call (called on the loop thread)."""
        out: list[Finished] = []
        while True:
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                return out
            self.active.pop(item.pull.reference, None)
            out.append(item)

    def due_progress(self, now: float) -> list[Pull]:
        """Pulls whose waiters should hear how far they got."""
        due = [
            p
            for p in self.active.values()
            if p.total_bytes and now - p.told_at >= DOWNLOAD_PROGRESS_EVERY_S
        ]
        for p in due:
            p.told_at = now
        return due

    def close(self) -> None:
        """Stop every transfer (part files stay for the next start)."""
        for pull in self.active.values():
            pull.cancel.set()
        with self._manager_lock:
            if self._manager is not None:
                self._manager.close()


def describe_progress(pull: Pull) -> str:
    """``12.3 MB/s, ETA 42 s, from hive beta, gamma`` for people."""
    text = f"{pull.rate / 1e6:.1f} MB/s"
    if pull.eta_s is not None:
        eta = f"{pull.eta_s:.0f} s" if pull.eta_s < 120 else f"{pull.eta_s / 60:.0f} min"
        text += f", ETA {eta}"
    where = pull.sources.where if pull.sources is not None else ""
    return f"{text}, from {where}" if where else text
