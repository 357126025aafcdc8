"""Giving model files to peer hives, so a model crosses the uplink once per LAN, not per machine.

A peer hive whose key has the ``hive`` or ``admin`` role asks FileQuery: does this hive hold a
verified file (by repo, commit, file and the Hub's sha256, or by an hf: reference its catalog
knows)? The answer carries the file's chunk list, made when the bytes were verified against the
Hub (rbee.hub.chunks). Then the peer asks ReadChunk for the chunks it wants, from every hive that
holds the file at once, and checks each one against the list.

Everything runs on the hive's loop: a chunk is one pread of CHUNK_BYTES (the page cache's, most
of the time), never a wait. The hive sends at most ``rate`` bytes/s (a token bucket): a request
over the budget waits in a queue that the loop serves as the bucket refills, so a hive that
shares never starves its own token streams of the link.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from rbee import log
from rbee.catalog import Catalog, ModelEntry
from rbee.errors import AccessDenied, InvalidRequest, ModelNotFound, RbeeError
from rbee.hive.request import Replies, Request
from rbee.hub import chunks
from rbee.hub.files import RemoteFile
from rbee.hub.layout import local_path
from rbee.hub.refs import parse_reference
from rbee.protocol.messages import ChunkData, FileHeld, FileQuery, ReadChunk

logger = log.get(__name__)

MAX_WAITING = 256  # chunk requests queued behind the rate limit; more are refused
BURST_S = 0.25  # the bucket holds this many seconds of the rate (at least one chunk)


@dataclass(frozen=True)
class Shared:
    """A file this hive told a peer it holds."""

    path: Path
    chunks: chunks.ChunkList


class Sharing:
    """The hive's side of peer downloads (loop thread only, but for chunk lists being made)."""

    def __init__(self, replies: Replies, catalog: Catalog, models_dir: Path, rate: int) -> None:
        self.replies = replies
        self.catalog = catalog
        self.models_dir = models_dir
        self.rate = rate  # bytes/s; 0: no limit
        self.files: dict[str, Shared] = {}  # sha256 → what peers may read
        self.waiting: deque[tuple[Request, ReadChunk]] = deque()
        self.tokens = float(self._burst())
        self.filled_at = time.monotonic()
        self.sent_bytes = 0
        self._indexing: set[Path] = set()  # files whose chunk list a thread is making
        self._lock = threading.Lock()

    def on_query(self, request: Request, frame: FileQuery) -> None:
        """Whether this hive holds the file, and its chunk list."""
        _require_peer(request, "asking for model files")
        found = self._held(frame)
        if found is None:
            self.replies.send(request, FileHeld(held=False, reason="not held here"))
            return
        remote, dest = found
        assert remote.sha256 is not None
        listed = chunks.load(dest, remote.sha256)
        if listed is None:
            self._index(dest, remote.sha256)
            self.replies.send(request, FileHeld(held=False, reason="its chunk list is being made"))
            return
        self.files[remote.sha256] = Shared(dest, listed)
        held = FileHeld(
            held=True,
            repo=remote.repo,
            commit=remote.commit,
            filename=remote.filename,
            sha256=remote.sha256,
            size=remote.size,
            chunk_bytes=listed.chunk_bytes,
            hashes=listed.hashes,
        )
        self.replies.send(request, held)

    def on_read(self, request: Request, frame: ReadChunk) -> None:
        """One chunk, now or when the rate allows."""
        _require_peer(request, "reading model files")
        shared = self.files.get(frame.sha256)
        if shared is None:
            raise ModelNotFound(f"this hive offered no file with sha256 {frame.sha256[:12]}…")
        if frame.index >= shared.chunks.count:
            raise InvalidRequest(f"chunk {frame.index} of a {shared.chunks.count}-chunk file")
        if len(self.waiting) >= MAX_WAITING:
            raise InvalidRequest(f"more than {MAX_WAITING} chunk requests wait here")
        self.waiting.append((request, frame))
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        """Send what the rate allows (called by the loop after each poll)."""
        if not self.waiting:
            return
        if self.rate:
            self.tokens = min(self.tokens + (now - self.filled_at) * self.rate, self._burst())
        self.filled_at = now
        while self.waiting and (self.tokens > 0 or not self.rate):
            request, frame = self.waiting.popleft()
            try:
                data = self._read(frame)
            except RbeeError as exc:
                self.replies.error(request, exc)
                continue
            self.tokens -= len(data)
            self.sent_bytes += len(data)
            self.replies.send(request, ChunkData(sha256=frame.sha256, index=frame.index, data=data))

    def due_in(self, now: float) -> float | None:
        """Seconds until waiting requests may go (None: nothing waits), for the loop's poll."""
        if not self.waiting:
            return None
        if not self.rate or self.tokens > 0:
            return 0.0
        return -self.tokens / self.rate - (now - self.filled_at)

    def _burst(self) -> int:
        return max(int(self.rate * BURST_S), chunks.CHUNK_BYTES)

    def _read(self, frame: ReadChunk) -> bytes:
        shared = self.files[frame.sha256]
        start, length = shared.chunks.span(frame.index)
        try:
            fd = os.open(shared.path, os.O_RDONLY)
            try:
                data = os.pread(fd, length, start)
            finally:
                os.close(fd)
        except OSError as exc:
            self.files.pop(frame.sha256, None)
            raise ModelNotFound(f"the file is no longer readable here: {exc.strerror}") from exc
        if len(data) != length:
            self.files.pop(frame.sha256, None)
            raise ModelNotFound("the file is shorter than when it was offered")
        return data

    def _held(self, frame: FileQuery) -> tuple[RemoteFile, Path] | None:
        """The file the query means and where it is, if this hive holds it (only verified files
        reach their final path: rbee.hub.layout)."""
        if frame.reference:
            entry = self._find_reference(frame.reference)
            if entry is None or not entry.sha256:
                return None
            repo, commit, name, sha256 = entry.repo, entry.revision, entry.file, entry.sha256
        else:
            repo, commit, name, sha256 = frame.repo, frame.commit, frame.filename, frame.sha256
        try:
            remote = RemoteFile(repo, name, commit, 0, sha256, "")
            dest = local_path(self.models_dir, remote)
            if not dest.is_file():
                return None
            return replace(remote, size=dest.stat().st_size), dest
        except (RbeeError, OSError):
            return None

    def _find_reference(self, reference: str) -> ModelEntry | None:
        """The catalog's entry for a reference: pulled under this very spelling, or (naming a
        file) any pull of that file at the revision asked, the newest first."""
        try:
            ref = parse_reference(reference)
        except RbeeError:
            return None
        entry = self.catalog.find_reference(ref.canonical())
        if entry is not None or ref.filename is None:
            return entry
        found = [
            e
            for e in self.catalog.entries()
            if e.provider == "hf"
            and e.repo == ref.repo
            and e.file == ref.filename
            and ref.revision in (None, e.revision)
        ]
        return max(found, key=lambda e: e.added_at) if found else None

    def _index(self, dest: Path, sha256: str) -> None:
        """Make a chunk list for a file downloaded before rbee kept them, off the loop; the
        file's bytes are checked against its sha256 on the way, and a file that fails is not
        listed (nor offered)."""
        with self._lock:
            if dest in self._indexing:
                return
            self._indexing.add(dest)

        def run() -> None:
            try:
                hasher, whole = chunks.ChunkHasher(), hashlib.sha256()
                with dest.open("rb") as f:
                    while block := f.read(chunks.CHUNK_BYTES):
                        hasher.update(block)
                        whole.update(block)
                if whole.hexdigest() == sha256:
                    chunks.save(dest, hasher.finish(), sha256)
                else:
                    logger.warning("a model file no longer matches its sha256", path=str(dest))
            except OSError as exc:
                logger.warning("cannot list a model file's chunks", path=str(dest), error=str(exc))
            finally:
                with self._lock:
                    self._indexing.discard(dest)

        threading.Thread(target=run, name="chunk-list", daemon=True).start()


def _require_peer(request: Request, what: str) -> None:
    if request.role not in ("hive", "admin"):
        raise AccessDenied(
            f"{what} needs the hive or admin role; this key has the {request.role} role",
            suggestion="on this hive: `rbee hive pair --role hive`, then pair the other hive",
        )
