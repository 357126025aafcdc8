"""A verified model file's chunk hashes: what lets hives fetch it from each other in pieces.

The Hub publishes one sha256 per file, which says only at the very end whether gigabytes of
bytes were right. A hive that fetches a file from its peers wants to know at each piece: the
file is cut into CHUNK_BYTES chunks and each one's sha256 is kept, next to the file, in
``<FILE>.chunks`` (JSON). The list is made while the file's bytes are verified against the Hub's
sha256 (the transfer hashes them anyway), so it describes the bytes that were verified, not
whatever the disk holds later: a copy that rots on disk is caught at the chunk it spoils.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 4 << 20  # one request to a peer: big enough for the link, small enough to retry
DIGEST_BYTES = 32
CHUNKS_SUFFIX = ".chunks"
CHUNKS_VERSION = 1


@dataclass(frozen=True)
class ChunkList:
    """The sha256 of each CHUNK_BYTES piece of one file (the last piece may be shorter)."""

    size: int
    chunk_bytes: int
    hashes: bytes  # DIGEST_BYTES per chunk, in order

    @property
    def count(self) -> int:
        """How many chunks the file has."""
        return chunk_count(self.size, self.chunk_bytes)

    def valid(self) -> bool:
        """Whether the list has one digest per chunk (a peer's list is checked with this)."""
        return self.chunk_bytes > 0 and len(self.hashes) == self.count * DIGEST_BYTES

    def span(self, index: int) -> tuple[int, int]:
        """Chunk ``index``'s first byte and length."""
        start = index * self.chunk_bytes
        return start, max(min(self.chunk_bytes, self.size - start), 0)

    def matches(self, index: int, data: bytes) -> bool:
        """Whether ``data`` is chunk ``index``, as verified."""
        digest = self.hashes[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES]
        return len(data) == self.span(index)[1] and hashlib.sha256(data).digest() == digest


def chunk_count(size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many chunks ``size`` bytes make."""
    return -(-size // chunk_bytes)


class ChunkHasher:
    """Hashes a file's bytes chunk by chunk as they stream past (fed in order, any sizes)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.size = 0
        self._digests: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the file."""
        view = memoryview(data)
        self.size += len(view)
        while view:
            take = min(self.chunk_bytes - self._filled, len(view))
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_bytes:
                self._digests.append(self._current.digest())
                self._current, self._filled = hashlib.sha256(), 0

    def finish(self) -> ChunkList:
        """The list for the bytes fed so far."""
        tail = [self._current.digest()] if self._filled else []
        return ChunkList(self.size, self.chunk_bytes, b"".join(self._digests + tail))


def chunks_path(dest: Path) -> Path:
    """Where ``dest``'s chunk list is kept."""
    return dest.with_name(dest.name + CHUNKS_SUFFIX)


def save(dest: Path, chunks: ChunkList, sha256: str) -> None:
    """Keep ``dest``'s chunk list (atomically), tied to the file's sha256, size and mtime: a
    file replaced or touched since is not described by it."""
    stat = dest.stat()
    record = {
        "version": CHUNKS_VERSION,
        "sha256": sha256,
        "size": chunks.size,
        "mtime_ns": stat.st_mtime_ns,
        "chunk_bytes": chunks.chunk_bytes,
        "hashes": chunks.hashes.hex(),
    }
    path = chunks_path(dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def load(dest: Path, sha256: str) -> ChunkList | None:
    """``dest``'s chunk list if one was kept for this very file and sha256, else None."""
    try:
        record = json.loads(chunks_path(dest).read_text(encoding="utf-8"))
        stat = dest.stat()
        chunks = ChunkList(
            int(record["size"]), int(record["chunk_bytes"]), bytes.fromhex(record["hashes"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same = (
        record.get("version") == CHUNKS_VERSION
        and record.get("sha256") == sha256
        and record.get("mtime_ns") == stat.st_mtime_ns
        and chunks.size == stat.st_size
    )
    return chunks if same and chunks.valid() else None


def forget(dest: Path) -> None:
    """Delete ``dest``'s chunk list (the file is being deleted or replaced)."""
    with contextlib.suppress(OSError):
        chunks_path(dest).unlink()
