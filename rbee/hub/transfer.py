"""Moving one Hub file's bytes: resumable, retried, stall-aware, verified, renamed atomically.

huggingface_hub resumes only within one call and does not check sha256, and a hive must
survive restarts, flaky Wi-Fi and a person pressing Ctrl-C, so rbee moves the bytes itself
with plain HTTP (httpx2, the client huggingface_hub 2.x is built on):

* **Resume.** Bytes go to the part file (layout.py). An attempt, in this process or after a
  restart, resumes with ``Range: bytes=N-`` when the sidecar says the part holds these remote
  bytes, and starts over otherwise. A 206 must start at N; a 200 (range ignored) starts over.
* **Verification.** The sha256 (the git blob sha1 for a file not in LFS) is computed while the
  bytes arrive, after hashing the existing part on a resume. The part is fsynced, verified, and
  ``os.replace``-d into place; a mismatch deletes part and sidecar (ChecksumMismatch).
* **Failure.** Every request has a connect timeout and a read timeout, which is the stall
  detector: no byte for STALL_TIMEOUT_S aborts the attempt. Failed attempts are retried after an
  exponential backoff; MAX_FAILED_ATTEMPTS in a row without a byte of progress give up.
* **Redirects** are followed by hand (the Hub sends LFS files to a CDN) and the token goes only
  to the origin of the first URL, the Hub's, never to another host.
* **Stopping.** The stop event is checked at every received chunk and during every wait;
  ``interrupt()`` shuts the socket of a body read that waits on a silent server, so a stop takes
  effect at once (while a request still waits for its response's headers, within
  STALL_TIMEOUT_S: httpx2 exposes the socket only with the response).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import httpx2

from rbee import log
from rbee.digest import HASH_CHUNK_BYTES, sha256_of
from rbee.errors import Canceled, ChecksumMismatch, DownloadFailed, InsufficientDisk, RbeeError
from rbee.hub import chunks
from rbee.hub.files import RemoteFile, http_status_error
from rbee.hub.layout import (
    check_disk,
    identity,
    is_complete,
    part_path,
    read_sidecar,
    sidecar_path,
    unlink,
    write_sidecar,
)

CONNECT_TIMEOUT_S = 10.0
STALL_TIMEOUT_S = 30.0  # the read timeout: no byte for this long aborts the attempt
MAX_FAILED_ATTEMPTS = 6  # in a row without progress; any progress resets the count
BACKOFF_BASE_S = 1.0  # the wait after the first failed attempt; doubles after each
BACKOFF_MAX_S = 30.0
MAX_REDIRECTS = 10
LOCK_TIMEOUT_S = 60.0  # the wait for another transfer of the same file (a stopping one)
LOCK_POLL_S = 0.05
PROGRESS_INTERVAL_S = 0.5
RATE_SMOOTHING = 0.3  # weight of the newest interval in the bytes/s average

ProgressFn = Callable[[int, int, float, float | None], None]
"""``(downloaded_bytes, total_bytes, bytes_per_s, eta_s)``; ``eta_s`` is None while the rate is
unknown. Called from the transfer's thread, at most every PROGRESS_INTERVAL_S (plus once when
a transfer starts or restarts from byte 0), and once when the file is complete."""

logger = log.get(__name__)


class PeerBytes(Protocol):
    """Other hives that may hold a file (rbee.hive.peer_files): the transfer asks them first."""

    def stream(
        self, remote: RemoteFile, offset: int, stop: threading.Event, note: Callable[[str], None]
    ) -> Iterator[bytes]:
        """The file's bytes from ``offset`` on, in order, each chunk verified; ends early when no
        peer can give more. ``note`` hears where the bytes come from now."""
        ...

    def distrust(self, remote: RemoteFile) -> None:
        """The bytes peers gave for ``remote`` failed the Hub's sha256: stop asking them."""
        ...

    def resolve(self, reference: str, stop: threading.Event) -> list[RemoteFile]:
        """The files a canonical hf: reference means, as peers that hold them recorded them
        (empty: none does)."""
        ...


@dataclass
class Sources:
    """Where a transfer may take bytes from, and (for progress) where they come from now."""

    peers: PeerBytes | None = None
    hub: bool = True
    where: str = ""


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""


class FileTransfer:
    """Brings one remote file to ``dest``: ``run()`` blocks until it is there and verified.

    ``token`` is sent only to the origin of ``remote.url``; ``stop`` ends the transfer with
    Canceled (the part file stays for a resume); ``report`` receives progress.
    """

    def __init__(
        self,
        remote: RemoteFile,
        dest: Path,
        http: httpx2.Client,
        *,
        token: str | None = None,
        report: ProgressFn | None = None,
        stop: threading.Event | None = None,
        sources: Sources | None = None,
    ) -> None:
        self.remote, self.dest, self.http, self.token = remote, dest, http, token
        self.sources = sources or Sources()
        self.peers = self.sources.peers  # None once their bytes failed the sha256
        self.peer_bytes = 0  # what this attempt took from peers
        self.part, self.sidecar = part_path(dest), sidecar_path(dest)
        self.stop = stop or threading.Event()
        self.meter = _Meter(remote.size, report or _ignore)
        self.offset = 0
        self.hasher = _Hasher(remote)
        self._socket: socket.socket | None = None  # of the response being read, for interrupt
        self._socket_lock = threading.Lock()

    def interrupt(self) -> None:
        """Wake a body read blocked on a silent server, so that a ``stop`` set before this call
        takes effect now rather than after STALL_TIMEOUT_S (safe from any thread)."""
        with self._socket_lock:
            sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the base one, even for TLS

    def run(self) -> str:
        """Download the file unless it is already in place; returns its sha256.

        Peers first when there are any; the Hub for what they cannot give. Bytes from peers
        that fail the Hub's sha256 as a whole (each chunk matched a lying peer's list) are
        thrown away, those peers distrusted, and the file fetched again from the Hub."""
        try:
            return self._run()
        except ChecksumMismatch:
            if not self.peer_bytes or self.peers is None or not self.sources.hub:
                raise
            self.peers.distrust(self.remote)
            logger.warning("bytes from peers failed the sha256; from the Hub", path=str(self.dest))
            self.peers = None
            self.offset, self.peer_bytes, self.hasher = 0, 0, _Hasher(self.remote)
            return self._run()

    def _run(self) -> str:
        if is_complete(self.dest, self.remote):
            return self._already_there()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        with self._open_locked() as f:
            if is_complete(self.dest, self.remote):  # another transfer finished meanwhile
                unlink(self.part, self.sidecar)  # what our open created, or a leftover
                return self._already_there()
            self.offset = self._resumable_bytes(f)
            size, what = self.remote.size, f"downloading {self.dest.name}"
            check_disk(self.dest.parent, size - self.offset, what)
            if not self.offset:
                f.truncate(0)
                write_sidecar(self.dest, self.remote)
            self._hash_existing(f)
            self.meter.start(self.offset)
            if self.peers is not None and self.offset < size:
                self._from_peers(f, self.peers)
            if self.offset < size and not self.sources.hub:
                raise DownloadFailed(
                    f"no peer in reach holds the rest of {self.remote.repo}/"
                    f"{self.remote.filename} (byte {self.offset} of {size} is here), and the "
                    "Hub is not to be asked",
                    suggestion="pull again without --no-hub, or when a hive holding it is up",
                )
            if self.offset < size:
                self.sources.where = "the Hub"
                self._transfer(f)
            os.fsync(f.fileno())
            sha256 = self._verify()
            os.replace(self.part, self.dest)
        _fsync_dir(self.dest.parent)
        unlink(self.sidecar)
        if self.remote.sha256 is not None:  # the chunk list peers fetch it by
            chunks.save(self.dest, self.hasher.chunks.finish(), sha256)
        self.meter.finish()
        logger.info("downloaded", path=str(self.dest), bytes=self.remote.size)
        return sha256

    def _already_there(self) -> str:
        self.meter.finish()
        return self.remote.sha256 or sha256_of(self.dest)

    @contextlib.contextmanager
    def _open_locked(self) -> Iterator[FileIO]:
        """The part file, opened for appending and locked: one writer across threads and
        processes. Waits (bounded) for a transfer that is stopping or finishing; if that one
        renamed or deleted the part meanwhile, opens the new one."""
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            f = self.part.open("a+b", buffering=0)  # unbuffered: what arrived is on disk
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                if time.monotonic() > deadline:
                    raise DownloadFailed(
                        f"another download of {self.dest} is still running", retryable=True
                    ) from None
                if self.stop.wait(LOCK_POLL_S):
                    raise self._canceled() from None
                continue
            if _same_file(f, self.part):
                break
            f.close()  # locked a file that is no longer the part: try the new one
        try:
            yield f
        finally:
            f.close()  # releases the lock

    def _resumable_bytes(self, f: FileIO) -> int:
        """How much of the part to keep: all of it if the sidecar says it holds these remote
        bytes (and no more of them than there are), else nothing."""
        size = os.fstat(f.fileno()).st_size
        if size and size <= self.remote.size and read_sidecar(self.dest) == identity(self.remote):
            logger.info("resuming download", path=str(self.dest), offset=size)
            return size
        return 0

    def _hash_existing(self, f: FileIO) -> None:
        f.seek(0)
        left = self.offset
        while left:
            if self.stop.is_set():
                raise self._canceled()
            chunk = f.read(min(HASH_CHUNK_BYTES, left))
            if not chunk:
                raise DownloadFailed(f"{self.part} shrank while it was read", retryable=True)
            self.hasher.update(chunk)
            left -= len(chunk)

    def _from_peers(self, f: FileIO, peers: PeerBytes) -> None:
        """Append what peers give, in order (each chunk verified by them before it gets here)."""

        def note(where: str) -> None:
            self.sources.where = where

        try:
            for data in peers.stream(self.remote, self.offset, self.stop, note):
                _write_all(f, data)
                self.hasher.update(data)
                self.offset += len(data)
                self.peer_bytes += len(data)
                self.meter.update(self.offset)
        except OSError as exc:
            raise _write_error(self.part, exc) from exc
        if self.stop.is_set():
            raise self._canceled()

    def _transfer(self, f: FileIO) -> None:
        failures = 0
        while self.offset < self.remote.size:
            if self.stop.is_set():
                raise self._canceled()
            before = self.offset
            try:
                self._attempt(f)
                continue
            except (_Retry, httpx2.TransportError) as exc:
                problem = str(exc) or repr(exc)
            except DownloadFailed as exc:
                if not exc.retryable:
                    raise
                problem = exc.message
            except OSError as exc:
                raise _write_error(self.part, exc) from exc
            if self.stop.is_set():  # the failure was interrupt() at work
                raise self._canceled()
            failures = 1 if self.offset > before else failures + 1
            if failures >= MAX_FAILED_ATTEMPTS:
                raise DownloadFailed(
                    f"downloading {self.remote.repo}/{self.remote.filename} failed {failures} "
                    f"times in a row at byte {self.offset} of {self.remote.size}: {problem}",
                    suggestion="check the network and pull again; the download will resume",
                )
            delay = min(BACKOFF_BASE_S * 2 ** (failures - 1), BACKOFF_MAX_S)
            logger.warning(
                "download attempt failed", path=str(self.dest), problem=problem, retry_in_s=delay
            )
            if self.stop.wait(delay):
                raise self._canceled()

    def _attempt(self, f: FileIO) -> None:
        """One GET from the current offset, following redirects by hand."""
        url = self.remote.url
        hub = _origin(url)
        timeout = httpx2.Timeout(STALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept-Encoding": "identity"}
            if self.offset:
                headers["Range"] = f"bytes={self.offset}-"
            if self.token and _origin(url) == hub:
                headers["Authorization"] = f"Bearer {self.token}"
            with self.http.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.has_redirect_location:
                    url = urljoin(url, response.headers["Location"])
                    continue
                self._accept(f, response)
                with self._interruptible(response):
                    self._receive(f, response)
                return
        raise _Retry(f"more than {MAX_REDIRECTS} redirects for {self.remote.url}")

    def _accept(self, f: FileIO, response: httpx2.Response) -> None:
        """Check the status and where the body starts; on a 200 start over from byte 0."""
        status, size = response.status_code, self.remote.size
        what = f"{self.remote.repo}/{self.remote.filename}"
        if status == 200:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) != size:
                raise DownloadFailed(
                    f"the Hub sends {length} bytes for {what}; its metadata says {size}",
                    retryable=False,
                )
            if self.offset:
                logger.info("the server ignored the range; starting over", path=str(self.dest))
                self._restart(f)
        elif status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if total is not None and total != size:
                raise DownloadFailed(
                    f"the Hub's {what} has {total} bytes; its metadata says {size}",
                    retryable=False,
                )
            if start != self.offset:
                asked = self.offset
                self._restart(f)
                raise _Retry(f"asked for bytes from {asked}, got a range from {start}")
        elif status == 416:
            asked = self.offset
            self._restart(f)
            raise _Retry(f"the range from byte {asked} is not satisfiable; starting over")
        else:
            raise http_status_error(status, what)

    @contextlib.contextmanager
    def _interruptible(self, response: httpx2.Response) -> Iterator[None]:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._socket_lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
        try:
            if self.stop.is_set():  # set before the socket was registered: interrupt missed it
                raise self._canceled()
            yield
        finally:
            with self._socket_lock:
                self._socket = None

    def _receive(self, f: FileIO, response: httpx2.Response) -> None:
        for chunk in response.iter_raw():  # as the socket delivers: nothing buffered is lost
            if self.stop.is_set():
                raise self._canceled()
            if self.offset + len(chunk) > self.remote.size:
                raise _Retry(f"the server sent more than {self.remote.size} bytes")
            _write_all(f, chunk)
            self.hasher.update(chunk)
            self.offset += len(chunk)
            self.meter.update(self.offset)
        if self.offset < self.remote.size:
            raise _Retry(f"the connection closed at byte {self.offset} of {self.remote.size}")

    def _restart(self, f: FileIO) -> None:
        f.truncate(0)
        self.offset = 0
        self.hasher = _Hasher(self.remote)
        self.meter.start(0)

    def _verify(self) -> str:
        expected, got = self.hasher.expected_and_actual()
        if got != expected:
            unlink(self.part, self.sidecar)
            kind = "sha256" if self.remote.sha256 else "git blob sha1"
            raise ChecksumMismatch(
                f"{self.remote.repo}/{self.remote.filename}: the Hub published {kind} "
                f"{expected}, the downloaded bytes have {got}; the download was deleted",
                suggestion="pull again; if it happens again, the file on the Hub may be broken",
            )
        return self.hasher.sha256.hexdigest()

    def _canceled(self) -> Canceled:
        return Canceled(
            f"the download of {self.remote.repo}/{self.remote.filename} stopped at byte "
            f"{self.offset} of {self.remote.size}; the next pull resumes it"
        )


class _Hasher:
    """The sha256 of the bytes so far, and the git blob sha1 when that is what the Hub gave."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.sha256 = hashlib.sha256()
        self.sha1 = None if remote.sha256 else hashlib.sha1(f"blob {remote.size}\0".encode())
        self.chunks = chunks.ChunkHasher()

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.chunks.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def expected_and_actual(self) -> tuple[str, str]:
        if self.remote.sha256 is not None or self.sha1 is None:
            return str(self.remote.sha256), self.sha256.hexdigest()
        return str(self.remote.blob_id), self.sha1.hexdigest()


class _Meter:
    """Byte counts → progress reports, at most every PROGRESS_INTERVAL_S, with a smoothed
    rate (bytes moved by this transfer, not those resumed) and an ETA."""

    def __init__(self, total: int, report: ProgressFn) -> None:
        self.total, self.report = total, report
        self.rate = 0.0
        self.started_at = self.last_at = time.monotonic()
        self.start_bytes = self.last_bytes = total  # until start(): nothing moved

    def start(self, offset: int) -> None:
        self.started_at = self.last_at = time.monotonic()
        self.start_bytes = self.last_bytes = offset
        self.report(offset, self.total, self.rate, None)

    def update(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.last_at
        if elapsed < PROGRESS_INTERVAL_S or elapsed <= 0:
            return
        instant = (done - self.last_bytes) / elapsed
        weight = RATE_SMOOTHING if self.rate else 1.0
        self.rate = weight * instant + (1 - weight) * self.rate
        self.last_at, self.last_bytes = now, done
        eta = (self.total - done) / self.rate if self.rate > 0 else None
        self.report(done, self.total, self.rate, eta)

    def finish(self) -> None:
        elapsed = time.monotonic() - self.started_at
        moved = self.total - self.start_bytes
        average = moved / elapsed if elapsed > 0 and moved > 0 else 0.0
        self.report(self.total, self.total, average, 0.0)


def _ignore(done: int, total: int, rate: float, eta: float | None) -> None:
    """The progress callback of a transfer nobody watches."""


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(start, total) of ``bytes START-END/TOTAL``; None for what is missing or ``*``."""
    unit, _, spec = value.strip().partition(" ")
    span, _, total = spec.partition("/")
    start = span.partition("-")[0]
    if unit.lower() != "bytes" or not start.isdigit():
        return None, None
    return int(start), int(total) if total.isdigit() else None


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL: where a token may go."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _write_all(f: FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = f.write(view)
        if not written:
            raise OSError(errno.EIO, f"wrote nothing to {f.name}")
        view = view[written:]


def _same_file(f: FileIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), path.stat())
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(path: Path, exc: OSError) -> RbeeError:
    if exc.errno == errno.ENOSPC:
        return InsufficientDisk(f"the disk filled up while writing {path}")
    return DownloadFailed(f"cannot write {path}: {exc.strerror or exc}", retryable=False)
