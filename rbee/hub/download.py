"""Pulling models from the Hub into a models directory: ``pull`` and the ``DownloadManager``.

``pull`` is what a hive calls (from a worker thread): parse the reference, ask the Hub which
files the revision holds, pick the GGUF file(s), check the disk, and fetch each file.

The manager runs each file's transfer (transfer.py) on a thread of its own, however many
callers want that file: two pulls of the same (repo, commit, file) share one transfer, and both
receive its progress and its result. Each caller may cancel its own interest; the transfer stops
only when nobody wants it any more, or when the manager closes (a hive shutting down), and it
stops at once, even while the server sends nothing (see transfer.py for the one exception). A
stopped transfer leaves its part file, and the next pull resumes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import httpx2

from rbee import __version__, log
from rbee.errors import Canceled, DownloadFailed, InternalError, ModelNotFound, RbeeError
from rbee.hub.files import RemoteFile
from rbee.hub.layout import (
    STALE_PART_AGE_S,
    check_disk,
    clean_stale_parts,
    local_path,
    part_path,
    remaining_bytes,
)
from rbee.hub.refs import HubRef, choose_gguf, parse_reference
from rbee.hub.transfer import FileTransfer, ProgressFn, Sources

if TYPE_CHECKING:
    from rbee.hub.client import HubClient

WAIT_POLL_S = 0.1  # how often a caller waiting on a transfer checks its cancel event
CLOSE_TIMEOUT_S = 10.0  # close(): the wait for each transfer thread

logger = log.get(__name__)


@dataclass(frozen=True)
class PulledFile:
    """A verified model file on this machine, and where it came from."""

    reference: str  # the canonical hf: reference that was pulled
    repo: str
    filename: str
    commit: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class ActiveDownload:
    """A transfer in progress, for status displays: which file, how far, how many wait on it."""

    repo: str
    filename: str
    commit: str
    done_bytes: int
    total_bytes: int
    callers: int


class DownloadManager:
    """Fetches Hub files into one models directory; thread-safe, one transfer per file."""

    def __init__(self, models_dir: Path, *, http: httpx2.Client | None = None) -> None:
        self.models_dir = models_dir
        self._own_http = http is None
        self._http = http or httpx2.Client(
            follow_redirects=False, headers={"User-Agent": f"rbee/{__version__}"}
        )
        self._lock = threading.Lock()
        self._transfers: dict[tuple[str, str, str], _Shared] = {}  # what new callers join
        self._running: set[_Shared] = set()  # also those stopping after their callers left
        self._closed = False

    def __enter__(self) -> DownloadManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def fetch(
        self,
        remote: RemoteFile,
        on_progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        token: str | None = None,
    ) -> Path:
        """The local path of ``remote``, downloaded and verified first unless already there.

        ``token`` (default: the environment's Hub token) is sent only to the host of
        ``remote.url``. Raises Canceled when ``cancel`` is set or the manager closes.
        """
        return self._fetch(remote, on_progress, cancel, token, Sources())[0]

    def pull(
        self,
        reference: str,
        on_progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        hub: HubClient | None = None,
        sources: Sources | None = None,
    ) -> list[PulledFile]:
        """Download the GGUF file(s) ``reference`` names; progress counts all parts together.

        ``hub`` defaults to a client for the environment's HF_ENDPOINT and HF_TOKEN (read now).
        ``sources`` says whether peers are asked first and whether the Hub may be; with peers,
        a Hub that does not answer (or may not be asked) leaves the peers' catalogs to say
        which files the reference means.
        """
        ref = parse_reference(reference)
        sources = sources or Sources()
        remotes, token = self._remotes(ref, hub, sources, cancel)
        missing = sum(remaining_bytes(self.models_dir, r) for r in remotes)
        if missing:
            check_disk(self.models_dir, missing, f"pulling {ref.canonical()}")
        total = sum(r.size for r in remotes)
        pulled: list[PulledFile] = []
        before = 0
        for r in remotes:
            progress = _whole(on_progress, before, total)
            path, sha256 = self._fetch(r, progress, cancel, token, sources)
            pulled.append(
                PulledFile(ref.canonical(), r.repo, r.filename, r.commit, path, r.size, sha256)
            )
            before += r.size
        return pulled

    def _remotes(
        self,
        ref: HubRef,
        hub: HubClient | None,
        sources: Sources,
        cancel: threading.Event | None,
    ) -> tuple[list[RemoteFile], str | None]:
        """The files ``ref`` means, pinned to a commit, and the Hub token for them: from the
        Hub, or, when it cannot or may not be asked, from what peers hold."""
        failed: RbeeError | None = None
        if sources.hub:
            from rbee.hub.client import HubClient  # huggingface_hub: only when a pull starts

            hub = hub or HubClient()
            try:
                snapshot = hub.snapshot(ref.repo, ref.revision_or_default, cancel)
                return [snapshot.file(n) for n in choose_gguf(snapshot.names, ref)], hub.token
            except DownloadFailed as exc:
                if not exc.retryable or sources.peers is None:
                    raise
                logger.warning("the Hub did not answer; asking peers", error=exc.message)
                failed = exc
        if sources.peers is not None:
            found = sources.peers.resolve(ref.canonical(), cancel or threading.Event())
            if found:
                return found, None
        if failed is not None:
            raise failed
        raise ModelNotFound(
            f"no hive in reach holds {ref.canonical()}, and the Hub is not to be asked",
            suggestion="pull without --no-hub, or pair with a hive that has it (--role hive)",
        )

    def active(self) -> list[ActiveDownload]:
        """The transfers running now."""
        with self._lock:
            transfers = list(self._transfers.values())
        return [t.snapshot() for t in transfers]

    def clean_stale_parts(self, max_age_s: float = STALE_PART_AGE_S) -> list[Path]:
        """:func:`rbee.hub.layout.clean_stale_parts` here, sparing running transfers."""
        with self._lock:
            keep = frozenset(part_path(t.dest) for t in self._running)
        return clean_stale_parts(self.models_dir, max_age_s, keep=keep)

    def close(self) -> None:
        """Stop every transfer and wait (bounded) for their threads; idempotent."""
        with self._lock:
            self._closed = True
            transfers = list(self._running)
        for t in transfers:
            t.halt()
        for t in transfers:
            t.thread.join(CLOSE_TIMEOUT_S)
            if t.thread.is_alive():
                logger.warning("a download thread did not stop", path=str(t.dest))
        if self._own_http:
            self._http.close()

    def _fetch(
        self,
        remote: RemoteFile,
        on_progress: ProgressFn | None,
        cancel: threading.Event | None,
        token: str | None,
        sources: Sources,
    ) -> tuple[Path, str]:
        with self._lock:
            if self._closed:
                raise Canceled("the download manager is closed")
            shared = self._transfers.get(remote.key)
            if shared is None:
                dest = local_path(self.models_dir, remote)
                if token is None:
                    from rbee.hub.client import hub_token

                    token = hub_token()
                shared = _Shared(remote, dest, self._http, token, self._finished, sources)
                self._transfers[remote.key] = shared
                self._running.add(shared)
                shared.thread.start()
            ticket = shared.add_caller(on_progress)
        while not shared.done.wait(WAIT_POLL_S):
            if cancel is not None and cancel.is_set():
                self._leave(shared, ticket)
                raise Canceled(f"the download of {remote.repo}/{remote.filename} was canceled")
        if shared.error is not None:
            raise _copy_error(shared.error) from shared.error
        assert shared.sha256 is not None
        return shared.dest, shared.sha256

    def _leave(self, shared: _Shared, ticket: int) -> None:
        with self._lock:
            if shared.remove_caller(ticket) == 0:
                shared.halt()  # nobody wants it any more
                if self._transfers.get(shared.remote.key) is shared:
                    del self._transfers[shared.remote.key]  # a new request starts afresh

    def _finished(self, shared: _Shared) -> None:
        with self._lock:
            self._running.discard(shared)
            if self._transfers.get(shared.remote.key) is shared:
                del self._transfers[shared.remote.key]


def pull(
    reference: str,
    models_dir: Path,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    *,
    manager: DownloadManager | None = None,
) -> list[PulledFile]:
    """Parse ``reference``, ask the Hub, pick the GGUF file(s), download and verify each.

    Blocking: the hive calls it from a worker thread. Pass the hive's long-lived ``manager`` so
    that concurrent pulls of one file share a transfer and a shutdown can stop them; without
    one, a manager lives for this call only. HF_ENDPOINT and HF_TOKEN are read now. Raises
    InvalidRequest, ModelNotFound, ModelAmbiguous, AccessDenied, InsufficientDisk,
    ChecksumMismatch, DownloadFailed or Canceled.
    """
    if manager is not None:
        if manager.models_dir != models_dir:
            raise InternalError(f"the manager serves {manager.models_dir}, not {models_dir}")
        return manager.pull(reference, on_progress, cancel)
    with DownloadManager(models_dir) as own:
        return own.pull(reference, on_progress, cancel)


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Shared:
    """One file's transfer, on its own thread, and the callers waiting for it."""

    remote: RemoteFile
    dest: Path
    http: httpx2.Client
    token: str | None
    on_finished: Callable[[_Shared], None]
    sources: Sources
    done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    sha256: str | None = None
    _callers: dict[int, ProgressFn | None] = field(default_factory=dict)
    _tickets: int = 0
    _done_bytes: int = 0
    _transfer: FileTransfer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        name = f"rbee-download-{self.remote.filename.rpartition('/')[2]}"
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add_caller(self, on_progress: ProgressFn | None) -> int:
        """Register one more caller; returns its ticket for ``remove_caller``."""
        with self._lock:
            self._tickets += 1
            self._callers[self._tickets] = on_progress
            return self._tickets

    def remove_caller(self, ticket: int) -> int:
        """Forget one caller; returns how many remain."""
        with self._lock:
            self._callers.pop(ticket, None)
            return len(self._callers)

    def halt(self) -> None:
        """Stop the transfer now, even in a read that waits on a silent server."""
        self.stop.set()
        with self._lock:
            transfer = self._transfer
        if transfer is not None:
            transfer.interrupt()

    def snapshot(self) -> ActiveDownload:
        """Where this transfer stands."""
        r = self.remote
        with self._lock:
            done, callers = self._done_bytes, len(self._callers)
        return ActiveDownload(r.repo, r.filename, r.commit, done, r.size, callers)

    def _report(self, done: int, total: int, rate: float, eta: float | None) -> None:
        with self._lock:
            self._done_bytes = done
            callbacks = [(t, fn) for t, fn in self._callers.items() if fn is not None]
        for ticket, fn in callbacks:
            try:
                fn(done, total, rate, eta)
            except Exception as exc:  # a broken progress display must not break the download
                logger.warning("dropped a failing progress callback", error=repr(exc))
                with self._lock:
                    if ticket in self._callers:
                        self._callers[ticket] = None

    def _run(self) -> None:
        try:
            transfer = FileTransfer(
                self.remote,
                self.dest,
                self.http,
                token=self.token,
                report=self._report,
                stop=self.stop,
                sources=self.sources,
            )
            with self._lock:
                self._transfer = transfer
            self.sha256 = transfer.run()
        except BaseException as exc:  # handed to every caller
            self.error = exc
            if not isinstance(exc, RbeeError):
                logger.exception("a download crashed", path=str(self.dest))
        finally:
            self.on_finished(self)
            self.done.set()


def _whole(on_progress: ProgressFn | None, before: int, total: int) -> ProgressFn | None:
    """Progress of one part of a split model, reported as progress of the whole model."""
    if on_progress is None:
        return None
    report = on_progress

    def whole(done: int, _total: int, rate: float, _eta: float | None) -> None:
        left = total - before - done
        report(before + done, total, rate, left / rate if rate > 0 else (None if left else 0.0))

    return whole


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh exception for one waiting caller (several threads may raise the same error)."""
    if isinstance(exc, RbeeError):
        return type(exc)(exc.message, suggestion=exc.suggestion, retryable=exc.retryable)
    return InternalError(f"a download crashed: {exc!r}")
