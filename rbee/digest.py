"""File digests: what the catalog records for an imported model and a download checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_CHUNK_BYTES = 4 * 1024 * 1024  # big reads are fast; 4 MiB keeps memory flat


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
